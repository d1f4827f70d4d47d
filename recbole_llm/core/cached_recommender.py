"""Train a RecBole recommender once and cache it: the frozen side models of Laser (its SR) and SeRALM (its base).

The models only read weights that exist (``recbole_llm.core.cached_model``); their trainers call ``ensure_trained``
(Laser's: before the model is built, before it trains, and on first use of a Laser a stock RecBole script scores
before any fit). Training keeps the caller's random streams as found, so the main run draws the same numbers
whether a cache was hit or not.
"""

import functools
import logging
import os

import torch
from recbole.data import create_dataset
from recbole.utils import init_seed

from recbole_llm.core.cached_model import load_recommender_weights, preserved_rng, require_given_checkpoint
from recbole_llm.core.checkpoint import atomic_torch_save, load_checkpoint
from recbole_llm.core.fileio import build_lock
from recbole_llm.core.lookup import get_trainer
from recbole_llm.core.preparation import data_preparation
from recbole_llm.core.registry import get_model

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def trainable_sr_class(name):
    """The RecBole model class used to train the SR here; for BERT4Rec a subclass that survives empty batches.

    RecBole's BERT4Rec masks each item with probability mask_ratio and never counts position 0 as a target, so a
    small batch (an epoch's last one, short histories) can have no target at all; its CE loss is then 0/0 = NaN and
    RecBole's trainer stops with "Training loss is nan" (seen on amazon-scientific, paper profile, a 5-row last
    batch). Such a batch carries no signal: it gets a zero loss. The weights are BERT4Rec's, saved as BERT4Rec.
    """
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


def ensure_trained(sr_config, cache_file, show_progress=False):
    """Train ``sr_config['model']`` into ``cache_file`` unless it is there (one process trains, others wait)."""
    if os.path.isfile(cache_file):
        logger.info(f"Frozen {sr_config['model']} loaded from cache {cache_file}")
        return
    with build_lock(cache_file, f"training the frozen {sr_config['model']} of '{sr_config['dataset']}'"):
        if not os.path.isfile(cache_file):  # a process that held the lock before us may have trained it
            # on first use the caller may be scoring (no_grad / inference mode): training needs gradients
            with preserved_rng(), torch.inference_mode(False), torch.enable_grad():
                train_frozen_sr(sr_config, cache_file, show_progress=show_progress)


def trained_recommender(sr_config, dataset, given, key, cache_file, show_progress=False, trust=False):
    """A RecBole ``sr_config['model']`` with trained weights, from the checkpoint ``given`` (config key
    ``key``), else from ``cache_file``, trained with RecBole first when absent. Global RNG state is left as
    found, so the caller's own initialisation is the same whether or not training happened."""
    name = sr_config["model"]
    if given:
        require_given_checkpoint(given, key, sr_config)
        path = given
    else:
        path = cache_file
        ensure_trained(sr_config, path, show_progress=show_progress)
    with preserved_rng():
        recommender = get_model(name)(sr_config, dataset)
    load_recommender_weights(recommender, path, key, sr_config, trust=trust and bool(given))
    return recommender

