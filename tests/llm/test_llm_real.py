"""The real bundled models: SmolLM2-135M-Instruct (GGUF -> safetensors cache) and all-MiniLM-L6-v2.

One conversion (about 20 s on 2 cores) is shared by the whole module through a module-scoped
fixture that points RECBOLE_LLM_CACHE at a temporary directory.
"""

import json
import os
import re
import time

import pytest
import torch

from recbole_llm.llm.encode import encode_texts_last, mean_pool_encode
from recbole_llm.llm.generate import build_chat_prompts, generate_batched
from recbole_llm.llm.bundled import bundled_llm_gguf
from recbole_llm.llm.gguf import converted_gguf_dir
from recbole_llm.llm.loader import hidden_size, load_causal_lm, load_text_encoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECBOLE_LLM_CACHE", str(tmp_path_factory.mktemp("llm_cache")))
        start = time.perf_counter()
        model, tokenizer = load_causal_lm(device="cpu")
        first_s = time.perf_counter() - start
        yield {"model": model, "tokenizer": tokenizer, "first_s": first_s, "dir": converted_gguf_dir(bundled_llm_gguf())}


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(device="cpu")


def test_conversion_writes_plain_safetensors(smollm):
    target = smollm["dir"]
    assert os.path.isfile(os.path.join(target, "model.safetensors"))
    config = json.loads(open(os.path.join(target, "config.json")).read())
    assert "quantization_config" not in config
    assert not [n for n in os.listdir(os.path.dirname(target)) if ".tmp-" in n]


def test_smollm_shape_and_frozen(smollm):
    model, tokenizer = smollm["model"], smollm["tokenizer"]
    assert hidden_size(model) == 576 and len(model.model.layers) == 30
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_cached_load_is_fast_and_identical(smollm):
    start = time.perf_counter()
    again, tokenizer = load_causal_lm(device="cpu")
    cached_s = time.perf_counter() - start
    assert cached_s < max(5.0, smollm["first_s"] / 3), (cached_s, smollm["first_s"])
    batch = tokenizer(["A microscope kit for students"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, smollm["model"](**batch).logits, atol=0, rtol=0)


def test_truncated_smollm_loads(smollm):
    short, tokenizer = load_causal_lm(device="cpu", num_layers=4)
    assert len(short.model.layers) == 4 and short.config.num_hidden_layers == 4
    vectors = encode_texts_last(short, tokenizer, ["lab glassware", "a toy robot"], progress=False)
    assert vectors.shape == (2, 576) and torch.isfinite(vectors).all()


def test_chat_generation_is_english_text(smollm):
    model, tokenizer = smollm["model"], smollm["tokenizer"]
    prompts = build_chat_prompts(tokenizer, ["What is a microscope used for? Answer in one sentence.",
                                             "Name one use of a glass beaker."])
    texts = generate_batched(model, tokenizer, prompts, max_new_tokens=16, progress=False)
    assert len(texts) == 2
    for text in texts:
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) >= 3, text
        assert sum(c.isascii() for c in text) / len(text) > 0.9, text


def test_minilm_vectors_are_normalized_and_semantic(minilm):
    model, tokenizer = minilm
    texts = ["A digital thermometer for the lab.", "Laboratory thermometer with a digital display.",
             "Romantic novel set in Paris."]
    vectors = mean_pool_encode(model, tokenizer, texts, progress=False)
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2
