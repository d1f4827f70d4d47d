"""Model and trainer lookup: the plugin first, then RecBole."""

import importlib

from recbole.utils import get_trainer as recbole_get_trainer

# get_model is re-exported: the model lookup lives with the names in the registry
from recbole_llm.core.registry import PLUGIN_TRAINERS, get_model  # noqa: F401
from recbole_llm.core.safe_trainer import safe_trainer_class


def get_trainer(model_type, model_name):
    """Trainer class for ``model_name``: the plugin's trainer for plugin models; for RecBole models the
    RecBole trainer wrapped so that its checkpoints load with ``torch.load(weights_only=True)``."""
    if model_name in PLUGIN_TRAINERS:
        module, cls = PLUGIN_TRAINERS[model_name]
        return getattr(importlib.import_module(module), cls)
    return safe_trainer_class(recbole_get_trainer(model_type, model_name))
