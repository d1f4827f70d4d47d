"""Model and trainer lookup: the plugin first, then RecBole."""

import importlib
import importlib.util

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_llm.errors import ConfigError
from recbole_llm.registry import PLUGIN_MODELS, PLUGIN_TRAINERS


def get_model(model_name):
    """Model class for ``model_name``: a plugin model, else any RecBole model."""
    if model_name in PLUGIN_MODELS:
        return getattr(importlib.import_module(PLUGIN_MODELS[model_name]), model_name)
    if _recbole_has_model(model_name):
        return recbole_get_model(model_name)
    known = ", ".join(sorted(PLUGIN_MODELS))
    raise ConfigError(
        f"Unknown model '{model_name}': it is neither a recbole_llm model ({known}) nor a RecBole model."
    )


def _recbole_has_model(model_name):
    # RecBole's own lookup imports recbole.model.exlib_recommender for any unknown name, which needs
    # xgboost and lightgbm; look in the other families first and touch exlib only for its two models.
    families = ["general_recommender", "context_aware_recommender", "sequential_recommender",
                "knowledge_aware_recommender"]
    if model_name.lower() in ("xgboost", "lightgbm"):
        families.append("exlib_recommender")
    for family in families:
        if importlib.util.find_spec(f"recbole.model.{family}.{model_name.lower()}") is not None:
            return True
    return False


def get_trainer(model_type, model_name):
    """Trainer class for ``model_name``: the plugin's trainer for plugin models; for RecBole models the
    RecBole trainer wrapped so that its checkpoints load with ``torch.load(weights_only=True)``."""
    if model_name in PLUGIN_TRAINERS:
        module, cls = PLUGIN_TRAINERS[model_name]
        return getattr(importlib.import_module(module), cls)
    from recbole_llm.trainer.safe import safe_trainer_class

    return safe_trainer_class(recbole_get_trainer(model_type, model_name))
