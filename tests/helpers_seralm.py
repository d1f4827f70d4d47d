"""Tiny data and settings for the SeRALM tests: a 12-item atomic dataset with titles, tiny models,
and a fake knowledge generator that needs no LLM."""

import os
import warnings

import torch

from recbole_llm.datasets.atomic import write_atomic
from tests.helpers_data import INTER_FIELDS

DATASET = "seralm-tiny"
N_ITEMS = 12  # real items; RecBole adds the padding item 0
N_USERS = 10

TITLES = ["Glass Beaker 250ml", "Digital Thermometer", "Nitrile Gloves", "Lab Kit for Kids", "Microscope Slides",
          "Steel Caliper", "Safety Mask", "pH Strips", "Magnet Set", "Battery Pack", "LED Lamp", "Test Tube Rack"]
BRANDS = ["Pyrex", "Etekcity", "", "Eisco", "AmScope", "iGaging", "3M", "Hydrion", "", "Duracell", "Philips", "Eisco"]


def write_tiny_dataset(root, n_items=N_ITEMS):
    """Atomic files for DATASET (its first ``n_items`` items) under ``root``; returns the data_path."""
    folder = os.path.join(str(root), DATASET)
    os.makedirs(folder, exist_ok=True)
    items = [(f"i{i}", title, brand, ["Industrial & Scientific", "Lab"])
             for i, (title, brand) in enumerate(zip(TITLES[:n_items], BRANDS[:n_items]))]
    write_atomic(os.path.join(folder, f"{DATASET}.item"),
                 [("item_id", "token"), ("title", "token"), ("brand", "token"), ("categories", "token_seq")], items)
    g = torch.Generator().manual_seed(0)
    inters = [(f"u{u}", f"i{i}", t) for u in range(N_USERS)
              for t, i in enumerate(torch.randperm(n_items, generator=g)[:8].tolist())]
    write_atomic(os.path.join(folder, f"{DATASET}.inter"), INTER_FIELDS, inters)
    return str(root)


def tiny_config_dict(tmp_path, n_items=N_ITEMS, **overrides):
    """Small model/training settings, caches in tmp_path, tiny LLM and encoder paths."""
    from recbole_llm.llm.tiny import tiny_encoder_dir, tiny_llm_dir

    cfg = {
        "data_path": write_tiny_dataset(tmp_path / "data", n_items),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp", "RATING_FIELD": None,
        "field_separator": "\t", "seq_separator": "|",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand", "categories"]},
        "item_text_fields": ["title", "brand", "categories"],
        "user_inter_num_interval": None, "item_inter_num_interval": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"], "topk": [5], "valid_metric": "NDCG@5",
        "train_neg_sample_args": None, "MAX_ITEM_LIST_LENGTH": 10,
        "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
        "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1, "embedding_size": 16,
        "k_interests": 2, "seg_num": 2, "kernel_size": 5, "channel_reduction": 4,
        "knowledge_proj_size": 6, "knowledge_dropout": 0.0,
        "train_text_encoder": False,  # the YAML default is the paper's True; tests of it set it themselves
        "llm_path": tiny_llm_dir(), "encoder_path": tiny_encoder_dir(),
        "knowledge_cache_dir": str(tmp_path / "knowledge"), "knowledge_max_new_tokens": 4, "knowledge_batch_size": 4,
        "checkpoint_dir": str(tmp_path / "saved"), "show_progress": False, "state": "WARNING", "log_wandb": False,
        "seed": 2020, "reproducibility": True, "use_gpu": False, "alignment": False,
    }
    cfg.update(overrides)
    return cfg


def build(model, tmp_path, **overrides):
    """(config, dataset, train_data, valid_data, test_data) for ``model`` on the tiny dataset."""
    from recbole.data import create_dataset, data_preparation

    from recbole_llm.core.config import Config

    config = Config(model=model, dataset=DATASET, config_dict=tiny_config_dict(tmp_path, **overrides), cmd_args=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)
    return config, dataset, train, valid, test


def fake_knowledge(text):
    """Deterministic stand-in for an LLM answer."""
    return f"{text} is useful; lab users would like it."


class FakeGenerator:
    """``prompts -> texts`` that records calls and can fail on a chosen batch (0-based)."""

    def __init__(self, fail_on_batch=None):
        self.fail_on_batch = fail_on_batch
        self.batches = []

    def __call__(self, prompts):
        if self.fail_on_batch is not None and len(self.batches) == self.fail_on_batch:
            raise KeyboardInterrupt("simulated kill")
        self.batches.append(list(prompts))
        return [fake_knowledge(p) for p in prompts]
