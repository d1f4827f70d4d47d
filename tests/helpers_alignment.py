"""Helpers for the alignment / generator tests: a tiny atomic dataset with item titles, tiny configs,
and the pieces (LoRA LLM, SeRALM model, frozen base, generator) built from them."""

import functools
import os
import random
import tempfile
import warnings

import torch

from recbole_llm.datasets.atomic import write_atomic
from tests.helpers_data import INTER_FIELDS

TINY_DATASET = "tinyalign"
N_USERS, N_ITEMS, PER_USER = 24, 16, 7
TITLE_WORDS = ["glass", "beaker", "tube", "steel", "scale", "lamp", "magnet", "kit", "pen", "paper", "gloves",
               "mask", "cable", "battery", "book", "toy"]


def write_tiny_dataset(folder):
    """``folder/tinyalign/tinyalign.{inter,item}``: 24 users x 7 interactions over 16 titled items."""
    rng = random.Random(0)
    path = os.path.join(folder, TINY_DATASET)
    os.makedirs(path, exist_ok=True)
    inters = []
    for user in range(N_USERS):
        start = rng.randrange(N_ITEMS)
        for t in range(PER_USER):  # mostly sequential patterns: item i then i+1
            item = (start + t) % N_ITEMS if rng.random() < 0.8 else rng.randrange(N_ITEMS)
            inters.append((f"u{user}", f"i{item}", t))
    write_atomic(os.path.join(path, f"{TINY_DATASET}.inter"), INTER_FIELDS, inters)
    items = [(f"i{item}", f"{TITLE_WORDS[item]} {TITLE_WORDS[(item * 3) % N_ITEMS]} set", f"brand{item % 3}")
             for item in range(N_ITEMS)]
    item_fields = [("item_id", "token"), ("title", "token"), ("brand", "token")]
    write_atomic(os.path.join(path, f"{TINY_DATASET}.item"), item_fields, items)
    return folder


@functools.lru_cache(maxsize=None)
def tiny_data_root():
    return write_tiny_dataset(tempfile.mkdtemp(prefix="recbole_llm_align_data_"))


BASE_CONFIG = {
    "dataset": TINY_DATASET,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand"]},
    "item_text_fields": ["title", "brand"],
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "MAX_ITEM_LIST_LENGTH": 4,
    "epochs": 1, "train_batch_size": 32, "eval_batch_size": 64, "stopping_step": 2,
    "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1, "embedding_size": 16,
    "k_interests": 2, "nv": 2, "nh": 2, "kernel_size": 2, "seg_num": 2, "channel_reduction": 4,
    "knowledge_proj_size": 8, "knowledge_max_new_tokens": 4, "knowledge_batch_size": 16,
    "train_text_encoder": False,  # the YAML default is the paper's True; tests of it set it themselves
    "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"],
    "align_max_new_tokens": 5, "align_warmup_epochs": 0, "alignment_steps": 1, "frozen_base_epochs": 1,
    "llm_learning_rate": 1e-2, "refresh_every": 1, "generator_mode": "sync",
    "show_progress": False, "state": "WARNING", "seed": 2020, "reproducibility": True, "log_wandb": False,
    "metrics": ["Recall", "NDCG"], "topk": [5], "valid_metric": "NDCG@5",
}


def tiny_config(model, tmp_path, **overrides):
    """Plugin Config for ``model`` on the tiny dataset with tiny LLM/encoder; caches under tmp_path."""
    from recbole_llm.core.config import Config
    from recbole_llm.llm.tiny import tiny_encoder_dir, tiny_llm_dir

    values = dict(BASE_CONFIG, data_path=tiny_data_root(), llm_path=tiny_llm_dir(), encoder_path=tiny_encoder_dir(),
                  knowledge_cache_dir=str(tmp_path / "knowledge"), checkpoint_dir=str(tmp_path / "saved"))
    values.update(overrides)
    return Config(model=model, dataset=TINY_DATASET, config_dict=values, cmd_args=[])


def tiny_data(config):
    """(dataset, train_data, valid_data, test_data) for a tiny config."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)
    return dataset, train, valid, test


def tiny_model(config, train_data):
    from recbole.utils import init_seed

    from recbole_llm.core.lookup import get_model

    init_seed(config["seed"], config["reproducibility"])
    return get_model(config["model"])(config, train_data._dataset).to(config["device"])


def set_threads():
    torch.set_num_threads(1)
