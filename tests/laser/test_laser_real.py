"""Laser with the real bundled SmolLM2-135M-Instruct (first 2 layers) on the tiny dataset: one loss step."""

import torch

from recbole_llm.laser.model import leading_special_ids
from tests import helpers_laser as H

torch.set_num_threads(1)


def test_laser_forward_and_loss_step_on_bundled_smollm2(tmp_path):
    config, model, train_data, _, _ = H.build(tmp_path, llm_path=None, llm_num_layers=2, n_query_tokens=2,
                                              item_text_max_tokens=8)
    assert model.llm_size == 576 and len(model.llm.model.layers) == 2
    text = model.tokenizer.decode(model.item_token_ids(torch.tensor([1]))[0])
    # add_special_tokens is on (the default), and SmolLM2's tokenizer puts nothing before a text: no BOS here
    assert text.startswith("You are an intelligent recommendation assistant.") and "\n>> 1." in text
    assert config["add_special_tokens"] and leading_special_ids(model.tokenizer) == []
    model.refresh_item_matrix(show_progress=False)
    assert model.item_matrix.shape == (model.n_items, 576)
    assert torch.allclose(model.item_matrix[1:].norm(dim=-1), torch.ones(model.n_items - 1), atol=1e-4)
    model.train()
    batch = H.first_batch(train_data)
    iic, lb = model.calculate_loss(batch)
    assert torch.isfinite(iic) and torch.isfinite(lb)
    (iic + lb).backward()
    assert model.suffix.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
