"""Checks of a finished config for plugin models: unknown keys and out-of-range values.

A misspelt key is silently ignored by RecBole; for the plugin's models it is an error that names the key,
suggests the closest known ones and says where keys are documented (``allow_unknown_keys: True`` passes
custom keys, e.g. for a subclass).
"""

import difflib
import functools
import glob
import os

import recbole
import yaml
from recbole.utils import argument_list

from recbole_llm.core.errors import ConfigError
from recbole_llm.core.keys import PLUGIN_YAML_ROOT, config_get, plugin_model_yamls, plugin_yaml_files
from recbole_llm.core.locate import resource_roots
from recbole_llm.core.registry import PLUGIN_MODELS

# Keys the plugin reads that are not model keys.
PLUGIN_KEYS = {
    "item_text_fields", "item_text_max_chars", "item_text_display_names", "trust_pickled_checkpoint",
    "resume_checkpoint", "resume", "allow_unknown_keys", "world_size", "ip", "port", "nproc", "offset", "local_rank",
    "model", "dataset", "config_files", "profile",
    "train_data_ratio",  # recbole_llm.core.preparation: train on a fixed fraction of the training data
    "valid_users",  # recbole_llm.core.preparation: validate during training on a fixed subset of users
    # keys RecBole derives itself but also accepts from the user
    "device", "single_spec", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "valid_neg_sample_args",
    "test_neg_sample_args", "eval_neg_sample_args",
    # documented RecBole data setting read by its Dataset but listed in no argument list or YAML
    "encoding",
}


def _check(predicate, expected):
    return predicate, expected


POSITIVE_INT = _check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = _check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
NON_NEGATIVE = _check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0")
POSITIVE = _check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")
PROBABILITY = _check(lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")
FRACTION = _check(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                  "a number in (0, 1] or ~")

# Ranges of the keys any run of the plugin reads (data preparation, the LLM loader and workers, the trainers); a
# model's own keys are declared by its class (``RANGES`` and ``CHOICES`` class attributes), see ``declared``.
# key -> (check, expected); None values are allowed where the YAML documents ~ as a choice.
RANGES = {
    "llm_num_layers": POSITIVE_INT,
    "encode_batch_size": POSITIVE_INT,
    "llm_workers": POSITIVE_INT,
    "llm_worker_cpus": POSITIVE_INT,
    "train_data_ratio": FRACTION,
    "valid_users": POSITIVE_INT,
    "learning_rate": POSITIVE,
    "train_batch_size": POSITIVE_INT,
}


def declared(model_class, attribute):
    """The ``attribute`` dicts (``CHOICES``: key -> allowed values; ``RANGES``: key -> (check, expected)) that
    ``model_class`` and its bases declare, merged with the nearest class winning. A model declares the switches it
    reads; a class without them (stock RecBole models) declares nothing."""
    table = {}
    for cls in reversed(getattr(model_class, "__mro__", ())):
        table.update(cls.__dict__.get(attribute) or {})
    return table


def check_choices(config, model_class):
    """ConfigError for a string switch that ``model_class`` declares set to a value it does not take."""
    for key, allowed in declared(model_class, "CHOICES").items():
        value = config_get(config, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"Config key '{key}' = {value!r} is not one of {', '.join(map(repr, allowed))}.")


def check_model_config(config, model_class):
    """The switches and ranges ``model_class`` declares, checked on ``config`` (a Config or a dict). Called by the
    plugin's Config before anything is written, and by the model's constructor for a config built elsewhere
    (stock RecBole's Config)."""
    check_choices(config, model_class)
    for key, rule in declared(model_class, "RANGES").items():
        _check_rule(key, config_get(config, key), rule)


@functools.lru_cache(maxsize=1)
def known_keys():
    """Every key RecBole or the plugin documents: argument lists, RecBole's YAMLs, the plugin's YAMLs."""
    keys = set(PLUGIN_KEYS)
    for name in dir(argument_list):
        value = getattr(argument_list, name)
        if name.endswith("_arguments") and isinstance(value, list):
            keys.update(value)
    roots = [os.path.join(os.path.dirname(recbole.__file__), "properties"),
             *(os.path.join(root, "properties") for root in resource_roots())]
    paths = [path for root in roots for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)]
    for path in paths + plugin_yaml_files():
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            keys.update(data)
    return frozenset(keys)


def _samples_negatives(value):
    """True when a ``train_neg_sample_args`` value (raw or as RecBole normalises it) turns sampling on."""
    if value is None or value == "None":
        return False
    distribution = value.get("distribution") if isinstance(value, dict) else value
    return distribution not in (None, "none", "None")


def check_softmax_training(config, model_name, softmax_loss=True):
    """Refuse negative sampling for a model whose loss is a softmax over all items.

    RecBole's TrainDataLoader turns sampling into extra rows with label 0, and these models read every row's item
    as the next item, so sampled negatives would silently train as positives. RecBole raises for its own
    CE-loss models; models that declare ``input_type`` skip that check, so the plugin's models make it here.
    """
    value = config_get(config, "train_neg_sample_args")
    if softmax_loss and _samples_negatives(value):
        raise ConfigError(
            f"{model_name} trains with a softmax over all items, so train_neg_sample_args must be None (~); got "
            f"{value!r}. RecBole's own Config starts from its default uniform sampling: pass "
            f"train_neg_sample_args: None, as RecBole asks for SASRec, or run through recbole_llm "
            f"(run_recbole_llm.py, recbole_llm.Config), which applies the model YAML's ~.")


def validate_config(config):
    """Raise ConfigError for unknown user keys (plugin models only) and out-of-range values."""
    final = config.final_config_dict
    if config["model"] in PLUGIN_MODELS:
        check_softmax_training(config, config["model"], softmax_loss=final.get("loss_type", "CE") == "CE")
    if config["model"] in PLUGIN_MODELS and not final.get("allow_unknown_keys"):
        known = known_keys()
        unknown = sorted(k for k in config.external_config_dict if k not in known)
        if unknown:
            documented = plugin_model_yamls(config["model"])
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=2)
                hints.append(f"'{key}'" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
            raise ConfigError(
                f"Unknown config key(s) for {config['model']}: {', '.join(hints)}. Keys are documented in "
                f"{' and '.join(os.path.relpath(p, os.path.dirname(PLUGIN_YAML_ROOT)) for p in documented)}; set "
                f"allow_unknown_keys: True to pass custom keys.")
    check_model_config(final, config.model_class)
    for key in RANGES:
        check_range(key, final.get(key))


def check_range(key, value):
    """ConfigError for a value of ``key`` outside its RANGES entry; None passes (~ where the YAML documents it)."""
    _check_rule(key, value, RANGES[key])


def _check_rule(key, value, rule):
    predicate, expected = rule
    if value is not None and not predicate(value):
        raise ConfigError(f"Config key '{key}' = {value!r} is out of range: expected {expected}.")
