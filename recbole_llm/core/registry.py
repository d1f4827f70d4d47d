"""The plugin's models and trainers, by name, and the model lookup. Adding a model = one line here + its module +
its YAML. Model modules are imported by name when looked up, so this module imports none of them."""

import importlib
import importlib.util

from recbole.utils import get_model as recbole_get_model

from recbole_llm.core.errors import ConfigError

# model name -> module holding a class of that name (a method's folder holds its model, trainer and YAML)
PLUGIN_MODELS = {
    "PAUP": "recbole_llm.paup.model",
    "CaserSeRALM": "recbole_llm.seralm.model",
    "SASRecSeRALM": "recbole_llm.seralm.model",
    "PAUPSeRALM": "recbole_llm.seralm.model",
    "LightSANsSeRALM": "recbole_llm.seralm.model",
    "Laser": "recbole_llm.laser.model",
}

# model name -> (module, trainer class name)
PLUGIN_TRAINERS = {
    "PAUP": ("recbole_llm.core.safe_trainer", "SafeTrainer"),
    "Laser": ("recbole_llm.laser.trainer", "LaserTrainer"),
    "CaserSeRALM": ("recbole_llm.seralm.alignment.trainer", "AlignmentTrainer"),
    "SASRecSeRALM": ("recbole_llm.seralm.alignment.trainer", "AlignmentTrainer"),
    "PAUPSeRALM": ("recbole_llm.seralm.alignment.trainer", "AlignmentTrainer"),
    "LightSANsSeRALM": ("recbole_llm.seralm.alignment.trainer", "AlignmentTrainer"),
}


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
