"""The plugin's models and trainers, by name, and the model lookup. Adding a model = one line here + its module +
its YAML. Model modules are imported by name when looked up, so this module imports none of them."""

import importlib
import importlib.util

from recbole.utils import get_model as recbole_get_model

from recbole_llm.errors import ConfigError

SEQ = "recbole_llm.model.sequential_recommender"

# model name -> module holding a class of that name
PLUGIN_MODELS = {
    "PAUP": f"{SEQ}.paup",
    "CaserSeRALM": f"{SEQ}.seralm",
    "SASRecSeRALM": f"{SEQ}.seralm",
    "PAUPSeRALM": f"{SEQ}.seralm",
    "LightSANsSeRALM": f"{SEQ}.seralm",
    "Laser": f"{SEQ}.laser",
}

# model name -> (module, trainer class name)
PLUGIN_TRAINERS = {
    "PAUP": ("recbole_llm.trainer.safe", "SafeTrainer"),
    "Laser": ("recbole_llm.trainer.laser_trainer", "LaserTrainer"),
    "CaserSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "SASRecSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "PAUPSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
    "LightSANsSeRALM": ("recbole_llm.trainer.alignment_trainer", "AlignmentTrainer"),
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
