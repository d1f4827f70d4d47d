"""recbole_llm: LLM-based sequential recommenders (Laser, SeRALM) as a RecBole plugin.

Importing the package registers every plugin model under ``recbole.model.sequential_recommender.<name>``
and every plugin trainer on ``recbole.trainer``, so RecBole's own ``get_model``, ``get_trainer``,
``run_recbole``, ``objective_function`` and ``load_data_and_model`` find them.
"""

__version__ = "0.1.0"


def _register():
    # registration: imported here so that the package namespace holds only its public names
    import importlib
    import sys

    import recbole.trainer

    _import_recbole_models_without_anomaly_mode()

    # registration: as above (package namespace); the model modules themselves are imported by name below
    from recbole_llm.core.checkpoint import register_safe_globals
    from recbole_llm.core.registry import PLUGIN_MODELS, PLUGIN_TRAINERS

    register_safe_globals()
    for name, module_path in PLUGIN_MODELS.items():
        module = importlib.import_module(module_path)
        # RecBole looks models up as recbole.model.<family>.<name.lower()> and reads the attribute <name>.
        sys.modules.setdefault(f"recbole.model.sequential_recommender.{name.lower()}", module)
    for name, (module_path, cls) in PLUGIN_TRAINERS.items():
        # RecBole's get_trainer reads recbole.trainer.<Model>Trainer.
        setattr(recbole.trainer, f"{name}Trainer", getattr(importlib.import_module(module_path), cls))


def _import_recbole_models_without_anomaly_mode():
    """Import RecBole's sequential models, undoing one import side effect: recbole 1.2.1's sine.py calls
    ``torch.autograd.set_detect_anomaly(True)`` at import time, which switches anomaly detection on for the whole
    process (every model, every backward pass: slower everywhere, and on CUDA a NaN check per op). Only the flag is
    restored, and only when this import is what ran sine.py; a user who wants anomaly mode can still turn it on."""
    # registration: kept out of the package namespace, as in _register
    import sys

    import torch

    if "recbole.model.sequential_recommender.sine" in sys.modules:
        return
    before = torch.is_anomaly_enabled()
    # registration: must run between reading and restoring the anomaly flag, so it cannot move to the top
    import recbole.model.sequential_recommender  # noqa: F401

    torch.autograd.set_detect_anomaly(before)


_register()

from recbole_llm.core.config import Config  # noqa: E402
from recbole_llm.core.lookup import get_model, get_trainer  # noqa: E402
from recbole_llm.run.recommendations import recommend  # noqa: E402

__all__ = ["Config", "get_model", "get_trainer", "recommend", "__version__"]
