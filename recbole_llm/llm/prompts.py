"""Prompt templates sent to the LLM.

SeRALM knowledge prompt (paper Figure 3): the item's own attributes are filled into a fixed instruction
that asks the LLM for (a) a short description of the item and (b) what kind of users would like it,
i.e. knowledge beyond what the dataset holds ("Titanic ... appeals to fans of historical dramas and
disaster movies"). The figure shows the idea, not a verbatim string; the wording below is ours.
"""

import hashlib

from recbole_llm.llm.generate import build_chat_prompts

KNOWLEDGE_SYSTEM = "Be brief."  # short on purpose: the prompt's prefill dominates CPU generation time

# The item comes last so that every prompt shares everything before it (encoded once, see
# recbole_llm.llm.prefix_generate).
KNOWLEDGE_TEMPLATE = (
    "Briefly describe this item and say what kind of users would like it.\n"
    "Item: {attrs}"
)


def knowledge_prompt(attrs_text):
    """The user message asking for one item's description and audience (chat template applied later)."""
    if not isinstance(attrs_text, str) or not attrs_text.strip():
        raise ValueError(f"knowledge_prompt needs the item's text attributes as a non-empty string, got {attrs_text!r}.")
    return KNOWLEDGE_TEMPLATE.format(attrs=attrs_text.strip())


def knowledge_prompt_parts(tokenizer, system=KNOWLEDGE_SYSTEM):
    """(prefix, tail): every chat-formatted knowledge prompt is ``prefix + " " + attrs + tail``.

    The space before the item text goes with the item (as " word" tokenises differently from " " + "word"),
    so tokenising prefix and suffix separately gives the same tokens as the whole prompt.
    """
    sentinel = "\u0000ITEM\u0000"
    prompt = build_chat_prompts(tokenizer, [knowledge_prompt(sentinel)], system=system)[0]
    if prompt.count(sentinel) != 1:
        raise ValueError("The chat template changed the knowledge prompt's item placeholder; cannot split it.")
    prefix, tail = prompt.split(sentinel)
    return prefix.rstrip(" "), tail


def knowledge_template_digest():
    """Changes whenever the wording changes, so cached knowledge from an older prompt is not reused."""
    return hashlib.sha256((KNOWLEDGE_SYSTEM + "\x00" + KNOWLEDGE_TEMPLATE).encode()).hexdigest()[:16]
