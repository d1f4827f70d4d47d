"""Checks of a finished config for plugin models: unknown keys and out-of-range values.

A misspelt key is silently ignored by RecBole; for the plugin's models it is an error that names the key,
suggests the closest known ones and says where keys are documented (``allow_unknown_keys: True`` passes
custom keys, e.g. for a subclass).
"""

import difflib
import functools
import glob
import os

import yaml

from recbole_llm.errors import ConfigError

# Keys the plugin reads that are not model keys.
PLUGIN_KEYS = {
    "item_text_fields", "item_text_max_chars", "item_text_display_names", "trust_pickled_checkpoint",
    "resume_checkpoint", "resume", "allow_unknown_keys", "world_size", "ip", "port", "nproc", "offset", "local_rank",
    "model", "dataset", "config_files", "profile",
    "train_data_ratio",  # recbole_llm.data.preparation: train on a fixed fraction of the training data
    "valid_users",  # recbole_llm.data.preparation: validate during training on a fixed subset of users
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

# key -> (check, expected); None values are allowed where the YAML documents ~ as a choice.
RANGES = {
    "n_experts": POSITIVE_INT,
    "n_query_tokens": POSITIVE_INT,
    "mformer_hidden_size": POSITIVE_INT,
    "mformer_n_layers": POSITIVE_INT,
    "mformer_n_heads": POSITIVE_INT,
    "temperature": POSITIVE,
    "lb_weight": NON_NEGATIVE,
    "alpha": NON_NEGATIVE,
    "refresh_every": POSITIVE_INT,
    "align_resume_every": NON_NEGATIVE_INT,
    "llm_num_layers": POSITIVE_INT,
    "encode_batch_size": POSITIVE_INT,
    "knowledge_batch_size": POSITIVE_INT,
    "llm_workers": POSITIVE_INT,
    "llm_worker_cpus": POSITIVE_INT,
    "knowledge_max_new_tokens": POSITIVE_INT,
    "knowledge_proj_size": POSITIVE_INT,
    "knowledge_dropout": PROBABILITY,
    "lora_r": POSITIVE_INT,
    "llm_learning_rate": POSITIVE,
    "stage1_epochs": NON_NEGATIVE,
    "stage2_epochs": NON_NEGATIVE,
    "train_samples_per_epoch": POSITIVE_INT,
    "train_data_ratio": FRACTION,
    "valid_users": POSITIVE_INT,
    "sampled_negatives": NON_NEGATIVE,
    "seg_num": POSITIVE_INT,
    "kernel_size": POSITIVE_INT,
    "learning_rate": POSITIVE,
    "train_batch_size": POSITIVE_INT,
}


@functools.lru_cache(maxsize=1)
def choices():
    """key -> allowed values of the plugin's string switches, taken from the modules that read them (imported
    lazily: they import this module). Checked at Config time so a typo stops the run before any file is written;
    the models check their own keys again for configs built elsewhere (stock RecBole)."""
    from recbole_llm.data.knowledge import GROUNDINGS, KNOWLEDGE_SOURCES
    from recbole_llm.model.frozen_sr import SUPPORTED_SR
    from recbole_llm.model.sequential_recommender.laser import (NO_MFORMER_PREFIXES, POOLINGS, PREFIX_INITS,
                                                          SCORE_CENTERINGS, SR_ITEM_STATES, SR_USER_STATES,
                                                          SUFFIX_INITS, TEMPLATES)
    from recbole_llm.model.sequential_recommender.mformer import ROUTER_GRADIENTS
    from recbole_llm.model.sequential_recommender.paup import POS_SCORE_SCALINGS
    from recbole_llm.model.sequential_recommender.seralm import KNOWLEDGE_CANDIDATES, KNOWLEDGE_CONCATS
    from recbole_llm.trainer.alignment_loss import BASELINES
    from recbole_llm.trainer.alignment_trainer import GENERATOR_MODES, KL_ESTIMATORS

    return {
        "pooling": POOLINGS,
        "template": tuple(TEMPLATES),
        "suffix_init": SUFFIX_INITS,
        "no_mformer_prefix": NO_MFORMER_PREFIXES,
        "score_centering": SCORE_CENTERINGS,
        "sr_user_state": SR_USER_STATES,
        "sr_item_state": SR_ITEM_STATES,
        "prefix_init": PREFIX_INITS,
        "router_gradient": ROUTER_GRADIENTS,
        "pos_score_scaling": POS_SCORE_SCALINGS,
        "frozen_sr_model": SUPPORTED_SR,
        "knowledge_source": (*KNOWLEDGE_SOURCES, "checkpoint"),  # checkpoint: read by the SeRALM models themselves
        "generator_mode": GENERATOR_MODES,
        "kl_estimator": KL_ESTIMATORS,
        "align_baseline": BASELINES,
        "knowledge_concat": KNOWLEDGE_CONCATS,
        "knowledge_grounding": GROUNDINGS,
        "knowledge_candidates": KNOWLEDGE_CANDIDATES,
    }


def check_choices(config, keys=None):
    """ConfigError for a string switch (``keys``, default all of :func:`choices`) set to a value it does not take."""
    from recbole_llm.config import config_get

    table = choices()
    for key in keys or table:
        value = config_get(config, key)
        if value is not None and value not in table[key]:
            raise ConfigError(f"Config key '{key}' = {value!r} is not one of {', '.join(map(repr, table[key]))}.")


@functools.lru_cache(maxsize=1)
def known_keys():
    """Every key RecBole or the plugin documents: argument lists, RecBole's YAMLs, the plugin's YAMLs."""
    import recbole
    from recbole.utils import argument_list

    from recbole_llm.config import PLUGIN_MODEL_YAML_DIR
    from recbole_llm.data.locate import REPO_DIR

    keys = set(PLUGIN_KEYS)
    for name in dir(argument_list):
        value = getattr(argument_list, name)
        if name.endswith("_arguments") and isinstance(value, list):
            keys.update(value)
    roots = [os.path.join(os.path.dirname(recbole.__file__), "properties"), PLUGIN_MODEL_YAML_DIR,
             os.path.join(REPO_DIR, "properties")]
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
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
    from recbole_llm.config import config_get

    value = config_get(config, "train_neg_sample_args")
    if softmax_loss and _samples_negatives(value):
        raise ConfigError(
            f"{model_name} trains with a softmax over all items, so train_neg_sample_args must be None (~); got "
            f"{value!r}. RecBole's own Config starts from its default uniform sampling: pass "
            f"train_neg_sample_args: None, as RecBole asks for SASRec, or run through recbole_llm "
            f"(run_recbole_llm.py, recbole_llm.Config), which applies the model YAML's ~.")


def validate_config(config):
    """Raise ConfigError for unknown user keys (plugin models only) and out-of-range values."""
    from recbole_llm.registry import PLUGIN_MODELS

    final = config.final_config_dict
    if config["model"] in PLUGIN_MODELS:
        check_softmax_training(config, config["model"], softmax_loss=final.get("loss_type", "CE") == "CE")
    if config["model"] in PLUGIN_MODELS and not final.get("allow_unknown_keys"):
        known = known_keys()
        unknown = sorted(k for k in config.external_config_dict if k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=2)
                hints.append(f"'{key}'" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
            raise ConfigError(
                f"Unknown config key(s) for {config['model']}: {', '.join(hints)}. Keys are documented in "
                f"recbole_llm/properties/model/{config['model']}.yaml; set allow_unknown_keys: True to pass "
                f"custom keys.")
    if config["model"] in PLUGIN_MODELS:
        check_choices(config)
    for key in RANGES:
        check_range(key, final.get(key))


def check_range(key, value):
    """ConfigError for a value of ``key`` outside its RANGES entry; None passes (~ where the YAML documents it)."""
    predicate, expected = RANGES[key]
    if value is not None and not predicate(value):
        raise ConfigError(f"Config key '{key}' = {value!r} is out of range: expected {expected}.")
