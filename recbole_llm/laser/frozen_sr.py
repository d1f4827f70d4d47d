"""The frozen ID-based sequential recommender of Laser: gives per-position states C_u [B, N, d_i].

BERT4Rec (the paper's choice) or SASRec, either from a given RecBole checkpoint (``frozen_sr_checkpoint``)
or trained with RecBole's own model and trainer on the same dataset and split, then cached:
``<frozen_sr_cache_dir or checkpoint_dir/frozen_sr>/<SR>-<dataset>-<key>.pth`` where the key digests the
data files, every config value the SR's training depends on and the package version. Cache files are
written atomically and read with ``recbole_llm.core.checkpoint.load_checkpoint`` (weights_only=True).

The model only builds the SR and reads weights that exist; training one is the trainer layer's job
(``recbole_llm.core.cached_recommender``): the run layer prepares it before the model is built
(``LaserTrainer.prepare_side_models``), and ``LaserTrainer.fit`` before it trains. A model built by a stock RecBole
script (which scores it before any ``fit``: its FLOPs count) has it trained on first use by the function
``recbole_llm.laser.trainer`` registers here.
"""

import os

import torch
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from torch import nn

from recbole_llm.core.cached_model import (
    DATA_KEYS, cache_key, key_values, load_recommender_weights, preserved_rng, require_given_checkpoint,
)
from recbole_llm.core.config import Config
from recbole_llm.core.keys import trusts_pickled_code
from recbole_llm.core.fingerprint import data_digest
from recbole_llm.core.registry import get_model

SUPPORTED_SR = ("BERT4Rec", "SASRec")

# (sr_config, weights_file, show_progress) -> None: trains and caches a missing SR. Registered by
# recbole_llm.laser.trainer (imported with the package's trainers), so this module holds no training.
_train_missing = None


def set_missing_weights_trainer(train):
    global _train_missing
    _train_missing = train

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


def cache_path(config, sr_config, digest):
    folder = config["frozen_sr_cache_dir"] or os.path.join(config["checkpoint_dir"], "frozen_sr")
    key = cache_key(key_values(sr_config), digest)
    return os.path.join(folder, f"{sr_config['model']}-{config['dataset']}-{key}.pth")


def build_sr_config(config):
    return Config(model=config["frozen_sr_model"], dataset=config["dataset"],
                  config_dict=sr_config_dict(config), cmd_args=[])


class FrozenSR(nn.Module):
    """Wraps a RecBole BERT4Rec/SASRec; never trained here (eval mode, requires_grad False). ``weights_file`` is
    where its trained weights are (given or cached) and ``loaded`` whether they have been read into it."""

    def __init__(self, recommender, sr_config=None, weights_file=None, checkpoint_key="frozen_sr_checkpoint",
                 show_progress=False):
        super().__init__()
        self.recommender = recommender
        self.hidden_size = recommender.hidden_size
        self.sr_config = sr_config
        self.weights_file = weights_file
        self.checkpoint_key = checkpoint_key
        self.show_progress = show_progress
        self.expected_keys = tuple(recommender.state_dict())
        self.loaded = False
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, trust=False):
        """Read the trained weights from ``weights_file`` into the recommender (on whatever device it is)."""
        load_recommender_weights(self.recommender, self.weights_file, self.checkpoint_key, self.sr_config,
                                 trust=trust, expected_keys=self.expected_keys)
        self.loaded = True

    def ensure_weights(self):
        """Read the trained weights, having the trainer layer train and cache them first if they are missing."""
        if self.loaded:
            return
        if not os.path.isfile(self.weights_file):
            if _train_missing is None:
                raise RuntimeError(
                    f"the frozen {type(self.recommender).__name__} has no trained weights (expected at "
                    f"{self.weights_file}) and nothing is registered to train it; import recbole_llm first")
            _train_missing(self.sr_config, self.weights_file, self.show_progress)
        self.load_weights()

    def train(self, mode=True):  # stays in eval mode (no dropout) whatever the parent does
        return super().train(False)

    @torch.no_grad()
    def item_states(self, items):
        """The SR's item embedding row of each item as a one-vector C [B, 1, d_i] and its mask."""
        self.ensure_weights()
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
        self.ensure_weights()
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        mask = positions.unsqueeze(0) < item_seq_len.unsqueeze(1)
        sr = self.recommender
        if isinstance(sr, BERT4Rec):
            if predictive:  # the input BERT4Rec predicts from: [MASK] after the last item (oldest item dropped)
                item_seq = sr.reconstruct_test_data(item_seq, item_seq_len)
                mask = positions.unsqueeze(0) < item_seq_len.unsqueeze(1)
            states = sr.forward(item_seq)  # RecBole's BERT4Rec already returns every position
        else:
            states = _sasrec_all_positions(sr, item_seq)
        return states, mask


def _sasrec_all_positions(sr, item_seq):
    """SASRec's forward without its final gather: the causal encoder's output at every position."""
    position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
    embedded = sr.item_embedding(item_seq) + sr.position_embedding(position_ids).unsqueeze(0)
    embedded = sr.dropout(sr.LayerNorm(embedded))
    attention_mask = sr.get_attention_mask(item_seq)
    return sr.trm_encoder(embedded, attention_mask, output_all_encoded_layers=True)[-1]


def frozen_sr_weights_file(config, sr_config=None):
    """Where the frozen SR of ``config`` has (or will have) its trained weights: the given checkpoint or the cache."""
    if config["frozen_sr_checkpoint"]:
        return config["frozen_sr_checkpoint"]
    sr_config = sr_config or build_sr_config(config)
    return cache_path(config, sr_config, data_digest(config))


def build_frozen_sr(config, dataset):
    """The frozen SR of the Laser ``config``/``dataset``, with its trained weights if they exist already (a given
    ``frozen_sr_checkpoint`` must). Built without moving the global RNG, so Laser's own init is the same
    whether the SR was cached, trained this run or is still to be trained."""
    sr_config = build_sr_config(config)
    path = frozen_sr_weights_file(config, sr_config)
    if config["frozen_sr_checkpoint"]:
        require_given_checkpoint(path, "frozen_sr_checkpoint", sr_config)
    with preserved_rng():
        recommender = get_model(sr_config["model"])(sr_config, dataset)
    frozen = FrozenSR(recommender, sr_config, path, show_progress=bool(config["show_progress"]))
    if os.path.isfile(path):
        frozen.load_weights(trust=trust_given_checkpoint(config))
    return frozen


def trust_given_checkpoint(config):
    """Whether a given (not cached) frozen_sr_checkpoint may be unpickled with code (trust_pickled_checkpoint)."""
    return bool(config["frozen_sr_checkpoint"]) and trusts_pickled_code(config)
