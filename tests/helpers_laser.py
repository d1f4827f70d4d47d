"""Tiny data, tiny LLM and tiny configs for the Laser tests (no shared conftest needed)."""

import os
import random

import torch

from recbole_llm.datasets.atomic import write_atomic
from tests.helpers_data import INTER_FIELDS
from recbole_llm.llm.tiny import tiny_llm_dir

WORDS = ["microscope", "beaker", "glass", "tube", "kit", "digital", "scale", "magnet", "battery", "cable",
         "lamp", "gloves", "safety", "steel", "plastic", "thermometer", "pen", "paper"]
BRANDS = ["Acme", "Labco", "Sci", "Kit"]


def write_tiny_dataset(root, name="tiny-laser", n_users=24, n_items=16, seed=0):
    """Atomic files for ``name`` under ``root/name``: users with 5-9 chronological interactions; items with
    title/brand/categories. Items follow a cyclic order per user so that the next item is learnable."""
    rng = random.Random(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    items = [(f"i{i}", " ".join(rng.sample(WORDS, 2)) + f" {i}", BRANDS[i % len(BRANDS)], ["science", f"lab {i % 3}"])
             for i in range(n_items)]
    write_atomic(os.path.join(folder, f"{name}.item"),
                 [("item_id", "token"), ("title", "token"), ("brand", "token"), ("categories", "token_seq")], items)
    inters = []
    for u in range(n_users):
        start = rng.randrange(n_items)
        inters += [(f"u{u}", f"i{(start + t) % n_items}", t) for t in range(rng.randint(5, 9))]
    write_atomic(os.path.join(folder, f"{name}.inter"), INTER_FIELDS, inters)
    return folder


def tiny_config_dict(root, name="tiny-laser", **overrides):
    """Laser config for the tiny dataset, tiny LLM and a tiny M-Former / frozen BERT4Rec."""
    config = {
        "data_path": str(root),
        "checkpoint_dir": os.path.join(str(root), "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp", "RATING_FIELD": None,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand", "categories"]},
        "seq_separator": "|",
        "user_inter_num_interval": None, "item_inter_num_interval": None,
        "item_text_fields": ["title", "brand", "categories"],
        "MAX_ITEM_LIST_LENGTH": 5,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "llm_path": tiny_llm_dir(),
        "use_gpu": False, "show_progress": False, "seed": 2020, "reproducibility": True,
        "state": "ERROR",
        "frozen_sr_hidden_size": 16, "frozen_sr_inner_size": 32, "frozen_sr_epochs": 2,
        "frozen_sr_batch_size": 64,
        "n_experts": 3, "n_query_tokens": 2, "mformer_hidden_size": 16, "mformer_n_layers": 2,
        "mformer_n_heads": 2, "mformer_inner_size": 32, "mformer_dropout": 0.0,
        "item_text_max_tokens": 12,
        "train_batch_size": 8, "eval_batch_size": 16, "encode_batch_size": 16,
        "learning_rate": 0.01, "stage1_epochs": 1, "stage2_epochs": 1, "train_samples_per_epoch": 16,
    }
    config.update(overrides)
    return config


def build(root, name="tiny-laser", **overrides):
    """(config, model, train_data, valid_data, test_data) for the tiny dataset."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_llm.core.config import Config
    from recbole_llm.run.quick_start import build_model

    if not os.path.isdir(os.path.join(str(root), name)):  # a test may have written its own variant of the data
        write_tiny_dataset(root, name)
    config = Config(model="Laser", dataset=name, config_dict=tiny_config_dict(root, name, **overrides), cmd_args=[])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = build_model(config, train_data._dataset)  # as the plugin's run does: frozen SR trained first
    return config, model, train_data, valid_data, test_data


def first_batch(data):
    for interaction in data:
        return interaction


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def seeded(seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
