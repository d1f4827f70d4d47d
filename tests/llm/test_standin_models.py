"""benchmarks/standin_models.py: same config and tokenizer as the source model, random weights, marked."""

import os

import torch

from benchmarks import common, standin_models
from recbole_llm.llm.loader import load_causal_lm, load_text_encoder
from recbole_llm.llm.tiny import tiny_encoder_dir, tiny_llm_dir


def test_export_drops_weights_and_build_gives_same_shapes_with_other_weights(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    standin_models.export(str(src), sources={"llm": tiny_llm_dir(), "encoder": tiny_encoder_dir()})
    assert not any(name.endswith(".safetensors") for part in ("llm", "encoder") for name in os.listdir(src / part))
    standin_models.build(str(src), str(out), seed=1)

    real, real_tok = load_causal_lm(tiny_llm_dir(), device="cpu")
    fake, fake_tok = load_causal_lm(str(out / "llm"), device="cpu")
    assert fake.config.to_dict()["num_hidden_layers"] == real.config.num_hidden_layers
    assert fake_tok("a microscope kit")["input_ids"] == real_tok("a microscope kit")["input_ids"]
    real_w, fake_w = dict(real.named_parameters()), dict(fake.named_parameters())
    assert {k: v.shape for k, v in real_w.items()} == {k: v.shape for k, v in fake_w.items()}
    assert not torch.equal(real_w["model.embed_tokens.weight"], fake_w["model.embed_tokens.weight"])
    encoder, _ = load_text_encoder(str(out / "encoder"), device="cpu")
    assert encoder.config.hidden_size == load_text_encoder(tiny_encoder_dir(), device="cpu")[0].config.hidden_size

    # tables made with stand-ins say so; tables made with real models do not
    assert "Stand-in models" in common.standin_warning({"llm_path": str(out / "llm")})
    assert common.standin_warning({"llm_path": tiny_llm_dir(), "epochs": 3}) == ""
