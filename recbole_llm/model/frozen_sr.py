"""The frozen ID-based sequential recommender of Laser: gives per-position states C_u [B, N, d_i].

BERT4Rec (the paper's choice) or SASRec, either from a given RecBole checkpoint (``frozen_sr_checkpoint``)
or trained here first with RecBole's own model and trainer on the same dataset and split, then cached:
``<frozen_sr_cache_dir or checkpoint_dir/frozen_sr>/<SR>-<dataset>-<key>.pth`` where the key digests the
data files, every config value the SR's training depends on and the package version. Cache files are
written atomically and read with ``recbole_llm.checkpoint.load_checkpoint`` (weights_only=True).
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import random

import numpy as np
import torch
from torch import nn

from recbole_llm.checkpoint import atomic_torch_save, load_checkpoint
from recbole_llm.fileio import build_lock
from recbole_llm.fingerprint import data_digest

SUPPORTED_SR = ("BERT4Rec", "SASRec")

# Laser config keys copied into the SR's config: they fix the data, its filtering and the split.
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
# Keys whose values decide the cached SR's weights, besides the data files' bytes and every DATA_KEYS value
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

logger = logging.getLogger(__name__)


def sr_config_dict(config):
    """config_dict for training/building the SR from the Laser config (data keys + frozen_sr_* keys)."""
    name = config["frozen_sr_model"]
    if name not in SUPPORTED_SR:
        raise ValueError(f"frozen_sr_model must be one of {SUPPORTED_SR}, got {name!r}")
    if name == "BERT4Rec" and int(0.2 * config["MAX_ITEM_LIST_LENGTH"]) < 1:
        raise ValueError(f"MAX_ITEM_LIST_LENGTH={config['MAX_ITEM_LIST_LENGTH']} is too short to train RecBole's "
                         "BERT4Rec (it masks int(0.2 * length) items, i.e. none); use >= 5 or frozen_sr_model: SASRec")
    values = {k: config[k] for k in DATA_KEYS if k in config and config[k] is not None}
    values.update(
        n_layers=config["frozen_sr_n_layers"], n_heads=config["frozen_sr_n_heads"],
        hidden_size=config["frozen_sr_hidden_size"], inner_size=config["frozen_sr_inner_size"],
        epochs=config["frozen_sr_epochs"], learning_rate=config["frozen_sr_learning_rate"],
        train_batch_size=config["frozen_sr_batch_size"], stopping_step=config["frozen_sr_stopping_step"],
        eval_batch_size=256, loss_type="CE", train_neg_sample_args=None, eval_step=1,
    )
    # RecBole's final data_path already ends with the dataset folder; the SR's Config appends it again.
    values["data_path"] = os.path.dirname(os.path.normpath(config["data_path"]))
    return values


def cache_key(values, digest):
    """Key of a cached trained recommender: its config ``values`` (minus NOT_KEY_FIELDS), the data digest
    and the package version. Shared by Laser's frozen SR and SeRALM's frozen base."""
    from recbole_llm.llm.loader import package_version

    values = {k: v for k, v in values.items() if k not in NOT_KEY_FIELDS}
    text = json.dumps(values, sort_keys=True, default=str) + digest + package_version()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sr_key_values(sr_config):
    """The SR config values its cached weights depend on."""
    return {k: sr_config[k] for k in KEY_FIELDS + DATA_KEYS if k in sr_config}


def cache_path(config, sr_config, digest):
    folder = config["frozen_sr_cache_dir"] or os.path.join(config["checkpoint_dir"], "frozen_sr")
    key = cache_key(sr_key_values(sr_config), digest)
    return os.path.join(folder, f"{sr_config['model']}-{config['dataset']}-{key}.pth")


def _build_sr_config(config):
    from recbole_llm.config import Config

    return Config(model=config["frozen_sr_model"], dataset=config["dataset"],
                  config_dict=sr_config_dict(config), cmd_args=[])


@functools.lru_cache(maxsize=None)
def trainable_sr_class(name):
    """The RecBole model class used to train the SR here; for BERT4Rec a subclass that survives empty batches.

    RecBole's BERT4Rec masks each item with probability mask_ratio and never counts position 0 as a target, so a
    small batch (an epoch's last one, short histories) can have no target at all; its CE loss is then 0/0 = NaN and
    RecBole's trainer stops with "Training loss is nan" (seen on amazon-scientific, paper profile, a 5-row last
    batch). Such a batch carries no signal: it gets a zero loss. The weights are BERT4Rec's, saved as BERT4Rec.
    """
    from recbole_llm.utils import get_model

    base = get_model(name)
    if name != "BERT4Rec":
        return base

    class BERT4RecSkippingEmptyBatches(base):
        def calculate_loss(self, interaction):
            if not bool((interaction[self.MASK_INDEX] > 0).any()):
                return self.item_embedding.weight.sum() * 0.0  # zero, but part of the graph: backward() works
            return super().calculate_loss(interaction)

    return BERT4RecSkippingEmptyBatches


def train_frozen_sr(sr_config, path, show_progress=False):
    """Train the SR with RecBole's model + trainer on the same data/split; save its best weights to ``path``."""
    from recbole.data import create_dataset
    from recbole.utils import init_seed

    from recbole_llm.data.preparation import data_preparation
    from recbole_llm.utils import get_trainer

    init_seed(sr_config["seed"], sr_config["reproducibility"])
    dataset = create_dataset(sr_config)
    train_data, valid_data, _ = data_preparation(sr_config, dataset)
    init_seed(sr_config["seed"], sr_config["reproducibility"])
    model = trainable_sr_class(sr_config["model"])(sr_config, train_data._dataset).to(sr_config["device"])
    trainer = get_trainer(sr_config["MODEL_TYPE"], sr_config["model"])(sr_config, model)
    trainer.saved_model_file = path + ".best.tmp"
    try:
        logger.info(f"Training the frozen {sr_config['model']} (cached afterwards at {path})")
        trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress, verbose=False)
        best = load_checkpoint(trainer.saved_model_file, map_location="cpu")
        atomic_torch_save({"state_dict": best["state_dict"], "model": sr_config["model"],
                           "best_valid_score": float(best["best_valid_score"]),
                           "n_items": int(dataset.item_num)}, path)
    finally:
        if os.path.exists(trainer.saved_model_file):
            os.remove(trainer.saved_model_file)
    logger.info(f"Frozen {sr_config['model']}: best valid {sr_config['valid_metric']} = "
                f"{float(best['best_valid_score']):.4f}")


class FrozenSR(nn.Module):
    """Wraps a trained RecBole BERT4Rec/SASRec; never trained (eval mode, requires_grad False)."""

    def __init__(self, recommender):
        super().__init__()
        self.recommender = recommender
        self.hidden_size = recommender.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # stays in eval mode (no dropout) whatever the parent does
        return super().train(False)

    @torch.no_grad()
    def item_states(self, items):
        """The SR's item embedding row of each item as a one-vector C [B, 1, d_i] and its mask."""
        states = self.recommender.item_embedding(items).unsqueeze(1)
        return states, torch.ones_like(items, dtype=torch.bool).unsqueeze(1)

    @torch.no_grad()
    def forward(self, item_seq, item_seq_len, predictive=False):
        """C_u [B, N, d_i] (states at every position) and the mask [B, N] of real (unpadded) items.

        RecBole sequences are right-padded: items at positions 0..len-1. For BERT4Rec C_u is what RecBole's
        ``forward`` returns, i.e. after its output head (Linear, GELU, LayerNorm), the states it scores items
        with; for SASRec it is the encoder output, which SASRec scores items with directly. Each is the state
        its own model predicts from, so the two are not the same layer of one architecture (paper Figure 4).
        """
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        mask = positions.unsqueeze(0) < item_seq_len.unsqueeze(1)
        sr = self.recommender
        if isinstance(sr, _bert4rec_class()):
            if predictive:  # the input BERT4Rec predicts from: [MASK] after the last item (oldest item dropped)
                item_seq = sr.reconstruct_test_data(item_seq, item_seq_len)
                mask = positions.unsqueeze(0) < item_seq_len.unsqueeze(1)
            states = sr.forward(item_seq)  # RecBole's BERT4Rec already returns every position
        else:
            states = _sasrec_all_positions(sr, item_seq)
        return states, mask


def _bert4rec_class():
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec

    return BERT4Rec


def _sasrec_all_positions(sr, item_seq):
    """SASRec's forward without its final gather: the causal encoder's output at every position."""
    position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
    embedded = sr.item_embedding(item_seq) + sr.position_embedding(position_ids).unsqueeze(0)
    embedded = sr.dropout(sr.LayerNorm(embedded))
    attention_mask = sr.get_attention_mask(item_seq)
    return sr.trm_encoder(embedded, attention_mask, output_all_encoded_layers=True)[-1]


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


def load_frozen_sr(config, dataset):
    """The frozen SR for the Laser ``config``/``dataset``: from ``frozen_sr_checkpoint`` or the cache
    (trained first when absent). Global RNG state is left as found, so Laser's own init is reproducible
    whether or not the SR had to be trained."""
    sr_config = _build_sr_config(config)
    recommender = trained_recommender(
        sr_config, dataset, given=config["frozen_sr_checkpoint"], key="frozen_sr_checkpoint",
        cache_file=cache_path(config, sr_config, data_digest(config)), show_progress=config["show_progress"],
        trust=bool(config["trust_pickled_checkpoint"]) if "trust_pickled_checkpoint" in config else False)
    return FrozenSR(recommender)


def trained_recommender(sr_config, dataset, given, key, cache_file, show_progress=False, trust=False):
    """A RecBole ``sr_config['model']`` with trained weights, from the checkpoint ``given`` (config key
    ``key``), else from ``cache_file``, trained with RecBole first when absent. Global RNG state is left as
    found, so the caller's own initialisation is the same whether or not training happened."""
    from recbole_llm.utils import get_model

    name = sr_config["model"]
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"{key} '{given}' does not exist; expected a RecBole {name} checkpoint "
                                    f"trained on '{sr_config['dataset']}'.")
        path = given
    else:
        path = cache_file
        if not os.path.isfile(path):
            with build_lock(path, f"training the frozen {name} of '{sr_config['dataset']}'"):
                if not os.path.isfile(path):  # a process that held the lock before us may have trained it
                    with preserved_rng():
                        train_frozen_sr(sr_config, path, show_progress=show_progress)
        else:
            logger.info(f"Frozen {name} loaded from cache {path}")
    checkpoint = load_checkpoint(path, map_location="cpu", trust_pickled_code=trust and bool(given))
    with preserved_rng():
        recommender = get_model(name)(sr_config, dataset)
    try:
        recommender.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"checkpoint '{path}' ({key}) does not fit a {name} with {dataset.item_num} items of "
                         f"dataset '{sr_config['dataset']}' and these sizes: {str(err).splitlines()[0]}") from None
    return recommender
