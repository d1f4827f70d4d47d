"""RecBole's ``data_preparation`` plus ``train_data_ratio``: training on a fixed fraction of the training data.

Laser's low-resource experiment (paper 4.3, Figure 3) trains on 5%, 10%, ... of the target domain's training
data and evaluates on the full validation and test splits. ``train_data_ratio: r`` keeps a fixed random
``round(r * n)`` (at least 1) of the n training instances, drawn with ``seed``, so every model (the baselines,
Laser and the frozen ID-based recommender Laser reads) sees the same subset. An instance is one row RecBole trains
on: for sequential models one (history, next item) pair of the augmented training data; the paper does not say
whether it sampled instances or users, and instances keep every user's history in the evaluation.
``~`` (the default) keeps everything; the test split is never cut.

``valid_users: n`` validates during training on a fixed random subset of n validation users (drawn with ``seed``),
for models whose every evaluation is expensive (Laser's LLM reads each user's history); the final test keeps all
users and RecBole's evaluator. ``~`` validates on every user.
"""

import torch
from recbole.data import data_preparation as recbole_data_preparation

from recbole_llm.core.keys import config_get
from recbole_llm.core.validation import check_range


def subset_indices(n, ratio, seed):
    """Sorted indices of the ``round(ratio * n)`` instances kept (at least one), the same for the same seed."""
    keep = max(1, round(ratio * n))
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:keep].sort().values


def limit_training_data(config, train_data):
    """``train_data`` itself when ``train_data_ratio`` keeps everything, else a loader of the same kind over the
    kept instances (same sampler and shuffling)."""
    ratio = config_get(config, "train_data_ratio")
    check_range("train_data_ratio", ratio)  # again here: a config built without the plugin's Config
    if ratio is None or ratio == 1:
        return train_data
    dataset = train_data._dataset
    kept = subset_indices(len(dataset), float(ratio), config["seed"])
    subset = dataset.copy(dataset.inter_feat[kept])
    return type(train_data)(config, subset, train_data._sampler, shuffle=train_data.shuffle)


def limit_validation_users(config, valid_data):
    """``valid_data`` itself, or a loader of the same kind over a fixed random subset of ``valid_users`` of its rows (one
    row per user in the leave-one-out split)."""
    count = config_get(config, "valid_users")
    check_range("valid_users", count)
    dataset = valid_data._dataset
    if count is None or count >= len(dataset):
        return valid_data
    kept = subset_indices(len(dataset), count / len(dataset), config["seed"])
    return type(valid_data)(config, dataset.copy(dataset.inter_feat[kept]), valid_data._sampler, shuffle=False)


def data_preparation(config, dataset):
    """RecBole's split into train/valid/test loaders, the training loader cut to ``train_data_ratio`` and the
    validation loader to ``valid_users``."""
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    return limit_training_data(config, train_data), limit_validation_users(config, valid_data), test_data
