"""Where the plugin's model keys are written (one default YAML per model, in its method's folder) and how any module
reads a key.

A leaf module: the plugin's Config and the checks it runs (validation) both import it. It names no method: a model's
YAML is found as ``<package>/<folder>/<Model>.yaml`` in whichever folder holds it.
"""

import functools
import glob
import os

import yaml
from recbole.config import Config as RecBoleConfig

# the package folder; each method's YAMLs sit one folder below it (laser/Laser.yaml, seralm/SeRALM.yaml, ...)
PLUGIN_YAML_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# model name -> YAMLs of keys it shares with other models, loaded in this order before its own: LLM.yaml (the LLM
# layer's keys), a base model's YAML, SeRALM.yaml (the keys of every SeRALM variant)
SHARED_YAMLS = {"Laser": ("LLM",), "CaserSeRALM": ("LLM", "SeRALM"), "SASRecSeRALM": ("LLM", "SeRALM"),
                "PAUPSeRALM": ("LLM", "PAUP", "SeRALM"), "LightSANsSeRALM": ("LLM", "SeRALM")}


def plugin_yaml_files():
    """Every default YAML of the plugin's methods."""
    return sorted(glob.glob(os.path.join(glob.escape(PLUGIN_YAML_ROOT), "*", "*.yaml")))


def plugin_model_yaml(model_name):
    """Path of the plugin's default YAML for ``model_name`` (None when the plugin has none)."""
    found = [path for path in plugin_yaml_files() if os.path.basename(path) == f"{model_name}.yaml"]
    if len(found) > 1:
        raise RuntimeError(f"Two plugin YAMLs for {model_name}: {found}; each model has one.")
    return found[0] if found else None


def plugin_model_yamls(model_name):
    """Every plugin YAML holding defaults of ``model_name``, in load order: the shared ones, then its own."""
    names = (*SHARED_YAMLS.get(model_name, ()), model_name)
    return [path for path in map(plugin_model_yaml, names) if path is not None]


@functools.lru_cache(maxsize=None)
def yaml_defaults(name):
    """The keys and values of the plugin YAML ``name`` (e.g. "SeRALM"), for code that must also take a plain dict
    config: its fallbacks come from the YAML, the one place a default is written. Read with RecBole's loader, as the
    Config reads it (``1e-4`` is a float, not a string)."""
    with open(plugin_model_yaml(name)) as f:
        return dict(yaml.load(f, Loader=RecBoleConfig._build_yaml_loader(None)) or {})


def llm_get(config, key):
    """``config[key]``, or LLM.yaml's default when the config (a plain dict) lacks it."""
    return config_get(config, key, yaml_defaults("LLM").get(key))


def trusts_pickled_code(config):
    """Whether a given checkpoint that the safe loader refuses may be unpickled with code: only when the user set
    ``trust_pickled_checkpoint: True`` (for any model, so no model YAML holds it; absent means no)."""
    return bool(config_get(config, "trust_pickled_checkpoint"))


def seralm_get(config, key):
    """``config[key]``, or SeRALM.yaml's default when the config (a plain dict) lacks it."""
    return config_get(config, key, yaml_defaults("SeRALM").get(key))


def config_get(config, key, default=None):
    """``config[key]`` for a Config or a plain dict; ``default`` when the key is absent or None (~)."""
    try:
        value = config[key]
    except (KeyError, TypeError):
        return default
    return default if value is None else value
