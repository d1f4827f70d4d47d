"""Tiny LLM / encoder for tests of every area (built once per process, well under a second).

Use ``tiny_llm()`` / ``tiny_encoder()`` for a fresh frozen (model, tokenizer) pair, or the directory
builders from recbole_llm.llm.tiny to pass a path through a config (``llm_path``, ``encoder_path``).
"""

import torch

from recbole_llm.llm.loader import load_causal_lm, load_text_encoder
from recbole_llm.llm.tiny import tiny_encoder_dir, tiny_llm_dir

TINY_TEXTS = [
    "Digital Thermometer, 3.5 mm probe (Pack of 2)",
    "lab kit",
    "Glass Beaker Set 50ml 100ml 250ml - Borosilicate, Graduated; brand: Eisco",
    "Héllo wörld: microscope slides & cover glasses",
    "x",
]


def tiny_llm_path():
    return tiny_llm_dir()


def tiny_encoder_path():
    return tiny_encoder_dir()


def tiny_llm(num_layers=None):
    """A fresh frozen tiny Llama (fp32, CPU) and its left-padding tokenizer."""
    return load_causal_lm(tiny_llm_dir(), device="cpu", dtype="float32", num_layers=num_layers)


def tiny_encoder():
    """A fresh frozen tiny BERT (fp32, CPU) and its tokenizer."""
    return load_text_encoder(tiny_encoder_dir(), device="cpu", dtype="float32")


def embeds_batch(model, tokenizer, texts):
    """Left-padded (inputs_embeds, attention_mask) for ``texts``, embeds detached and requiring grad."""
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    return embeds, batch["attention_mask"]


def set_threads_for_tests():
    torch.set_num_threads(1)
