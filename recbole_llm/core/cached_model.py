"""A RecBole model trained once and cached as a side model of another (Laser's frozen SR, SeRALM's frozen base):
the config keys it shares with the main run, its cache key, a guard that keeps the caller's random streams, and
loading its weights. Training it is the trainer layer's (``recbole_llm.core.cached_recommender``)."""

import contextlib
import hashlib
import json
import os
import random

import numpy as np
import torch

from recbole_llm.core.checkpoint import load_checkpoint
from recbole_llm.core.fingerprint import package_version

# Keys of the main run copied into a side model's config: they fix the data, its filtering and the split.
DATA_KEYS = (
    "data_path", "field_separator", "seq_separator", "USER_ID_FIELD", "ITEM_ID_FIELD", "RATING_FIELD",
    "TIME_FIELD", "seq_len", "LABEL_FIELD", "threshold", "NEG_PREFIX", "load_col", "unload_col", "unused_col",
    "additional_feat_suffix", "rm_dup_inter", "val_interval", "filter_inter_by_user_or_item",
    "user_inter_num_interval", "item_inter_num_interval", "alias_of_user_id", "alias_of_item_id",
    "alias_of_entity_id", "alias_of_relation_id", "preload_weight", "normalize_field", "normalize_all",
    "ITEM_LIST_LENGTH_FIELD", "LIST_SUFFIX", "MAX_ITEM_LIST_LENGTH", "POSITION_FIELD", "benchmark_filename",
    "eval_args", "metrics", "topk", "valid_metric", "seed", "reproducibility", "use_gpu", "gpu_id",
    "checkpoint_dir", "state", "show_progress", "worker", "train_data_ratio",
)
# Keys whose values decide a cached side model's weights, besides the data files' bytes and every DATA_KEYS value
# except those in NOT_KEY_FIELDS.
KEY_FIELDS = ("model", "n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob",
              "attn_dropout_prob", "hidden_act", "layer_norm_eps", "initializer_range", "mask_ratio", "ft_ratio",
              "loss_type", "epochs", "learning_rate", "train_batch_size", "stopping_step", "seed",
              "MAX_ITEM_LIST_LENGTH", "eval_args", "valid_metric", "load_col", "rm_dup_inter", "val_interval",
              "filter_inter_by_user_or_item", "user_inter_num_interval", "item_inter_num_interval", "threshold")
# Settings that do not change the trained weights: where files go, logging, the device, the reported metrics
# (valid_metric, which early stopping reads, is keyed) and data_path (the data files are keyed by their
# bytes, so a moved dataset keeps its cache).
NOT_KEY_FIELDS = ("data_path", "checkpoint_dir", "state", "show_progress", "worker", "use_gpu", "gpu_id", "device",
                  "metrics", "topk")


def cache_key(values, digest):
    """Key of a cached trained recommender: its config ``values`` (minus NOT_KEY_FIELDS), the data digest
    and the package version. Shared by Laser's frozen SR and SeRALM's frozen base."""
    values = {k: v for k, v in values.items() if k not in NOT_KEY_FIELDS}
    text = json.dumps(values, sort_keys=True, default=str) + digest + package_version()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_values(config):
    """The values of a side model's ``config`` its cached weights depend on."""
    return {k: config[k] for k in KEY_FIELDS + DATA_KEYS if k in config}


@contextlib.contextmanager
def preserved_rng():
    """Run a block (training or building a side model) without moving the caller's random streams, so
    the main run draws the same numbers whether a cache was hit or not."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def require_given_checkpoint(path, key, config):
    """A side model's checkpoint given by the user (config key ``key``) must exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} '{path}' does not exist; expected a RecBole {config['model']} checkpoint "
                                f"trained on '{config['dataset']}'.")


def load_recommender_weights(recommender, path, key, sr_config, trust=False, expected_keys=None):
    """Load a trained RecBole checkpoint's state_dict into ``recommender``; a clear error when it does not fit.
    ``expected_keys``: the state_dict keys the recommender had when built (a profiler such as the thop that
    stock RecBole's FLOPs count uses adds buffers of its own before a lazily loaded SR gets its weights)."""
    checkpoint = load_checkpoint(path, map_location="cpu", trust_pickled_code=trust)
    expected = set(recommender.state_dict()) if expected_keys is None else set(expected_keys)
    try:
        result = recommender.load_state_dict(checkpoint["state_dict"], strict=False)  # sizes are still checked
        wrong = sorted(set(result.missing_keys) & expected) + sorted(result.unexpected_keys)
        if wrong:
            raise RuntimeError(f"missing or unexpected keys: {', '.join(wrong[:8])}")
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"checkpoint '{path}' ({key}) does not fit a {sr_config['model']} with "
                         f"{recommender.n_items} items of dataset '{sr_config['dataset']}' and these sizes: "
                         f"{' '.join(str(err).split())[:600]}") from None
