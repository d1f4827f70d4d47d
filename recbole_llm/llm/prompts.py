"""Prompt templates sent to the LLM.

SeRALM knowledge prompt (paper Figure 3): the item's own attributes are filled into a fixed instruction
that asks the LLM for (a) a short description of the item and (b) what kind of users would like it,
i.e. knowledge beyond what the dataset holds ("Titanic ... appeals to fans of historical dramas and
disaster movies"). The figure shows the idea, not a verbatim string; the wording below is ours.
"""

import hashlib

KNOWLEDGE_SYSTEM = "Be brief."  # short on purpose: the prompt's prefill dominates CPU generation time

KNOWLEDGE_TEMPLATE = (
    "Item: {attrs}\n"
    "Briefly describe this item and say what kind of users would like it."
)


def knowledge_prompt(attrs_text):
    """The user message asking for one item's description and audience (chat template applied later)."""
    if not isinstance(attrs_text, str) or not attrs_text.strip():
        raise ValueError(f"knowledge_prompt needs the item's text attributes as a non-empty string, got {attrs_text!r}.")
    return KNOWLEDGE_TEMPLATE.format(attrs=attrs_text.strip())


def knowledge_template_digest():
    """Changes whenever the wording changes, so cached knowledge from an older prompt is not reused."""
    return hashlib.sha256((KNOWLEDGE_SYSTEM + "\x00" + KNOWLEDGE_TEMPLATE).encode()).hexdigest()[:16]
