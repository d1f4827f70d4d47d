"""Laser's zero-shot and low-resource transfer (paper 4.3, Figure 3): ``train_data_ratio`` for every model (the
frozen SR included), ``init_checkpoint`` and the evaluation without training."""

import os

import pytest
import torch

from tests import helpers_laser as H

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("transfer")


def _prepared(root, name, **overrides):
    from recbole.data import create_dataset

    from recbole_llm.core.config import Config
    from recbole_llm.core.preparation import data_preparation

    H.write_tiny_dataset(root, name)
    values = dict(H.tiny_config_dict(root, name), loss_type="CE", train_neg_sample_args=None, **overrides)
    config = Config(model="SASRec", dataset=name, config_dict=values, cmd_args=[])
    return config, data_preparation(config, create_dataset(config))


def test_train_data_ratio_keeps_a_fixed_fraction_of_the_training_instances(root):
    from recbole_llm.core.errors import ConfigError

    _, (full, full_valid, full_test) = _prepared(root, "tiny-a")
    _, (cut, valid, test) = _prepared(root, "tiny-a", train_data_ratio=0.25)
    _, (again, _, _) = _prepared(root, "tiny-a", train_data_ratio=0.25)
    _, (other_seed, _, _) = _prepared(root, "tiny-a", train_data_ratio=0.25, seed=7)
    n = len(full.dataset)
    assert len(cut.dataset) == round(0.25 * n) < n
    rows = cut.dataset.inter_feat
    assert torch.equal(rows["item_id"], again.dataset.inter_feat["item_id"])  # the same subset for the same seed
    assert not torch.equal(rows["item_id_list"], other_seed.dataset.inter_feat["item_id_list"])
    full_rows = {(tuple(s.tolist()), int(t)) for s, t in zip(full.dataset.inter_feat["item_id_list"],
                                                              full.dataset.inter_feat["item_id"])}
    assert all((tuple(s.tolist()), int(t)) in full_rows for s, t in zip(rows["item_id_list"], rows["item_id"]))
    assert sum(len(b) for b in cut) == len(cut.dataset)  # the loader serves the subset, nothing else
    assert len(valid.dataset) == len(full_valid.dataset) and len(test.dataset) == len(full_test.dataset)
    _, (tiny, _, _) = _prepared(root, "tiny-a", train_data_ratio=1e-6)
    assert len(tiny.dataset) == 1  # at least one instance
    for bad in (0, 1.5, "half"):
        with pytest.raises(ConfigError, match="train_data_ratio"):
            _prepared(root, "tiny-a", train_data_ratio=bad)


def test_valid_users_validates_on_a_fixed_subset_and_the_test_keeps_every_user(root):
    from recbole_llm.core.errors import ConfigError

    _, (_, full_valid, full_test) = _prepared(root, "tiny-v")
    _, (_, valid, test) = _prepared(root, "tiny-v", valid_users=5)
    _, (_, again, _) = _prepared(root, "tiny-v", valid_users=5)
    users = valid.dataset.inter_feat["user_id"]
    assert len(valid.dataset) == 5 < len(full_valid.dataset) and len(test.dataset) == len(full_test.dataset)
    assert torch.equal(users, again.dataset.inter_feat["user_id"]) and len(set(users.tolist())) == 5
    assert set(users.tolist()) <= set(full_valid.dataset.inter_feat["user_id"].tolist())
    assert sum(len(batch[0]) for batch in valid) == 5  # the full-sort loader serves the subset, nothing else
    _, (_, everyone, _) = _prepared(root, "tiny-v", valid_users=10 ** 6)
    assert len(everyone.dataset) == len(full_valid.dataset)
    with pytest.raises(ConfigError, match="valid_users"):
        _prepared(root, "tiny-v", valid_users=0)


def test_the_frozen_sr_trains_on_the_same_fraction_and_is_cached_apart(root):
    from recbole_llm.core.config import Config
    from recbole_llm.laser.frozen_sr import sr_config_dict

    values = H.tiny_config_dict(root, "tiny-a")
    full = sr_config_dict(Config(model="Laser", dataset="tiny-a", config_dict=values, cmd_args=[]))
    cut = sr_config_dict(Config(model="Laser", dataset="tiny-a", config_dict=dict(values, train_data_ratio=0.5),
                                cmd_args=[]))
    assert "train_data_ratio" not in full and cut["train_data_ratio"] == 0.5  # ~ keeps the existing cache keys


def test_init_checkpoint_moves_laser_to_another_dataset_zero_shot_and_low_resource(root):
    from recbole_llm.core.errors import ConfigError, DataNotFoundError
    from recbole_llm.laser.trainer import LaserTrainer

    # "Pre-training" domain: a tiny Laser trained and saved.
    config, source, train, valid, _ = H.build(root, "tiny-source")
    pretraining = LaserTrainer(config, source)
    pretraining.fit(train, valid, saved=True)
    saved = pretraining.saved_model_file
    source_state = torch.load(saved, weights_only=True)["state_dict"]  # the best epoch, as saved

    # Target domain, other items: the trainable weights start as the source's, the item matrix is its own.
    H.write_tiny_dataset(root, "tiny-target", n_items=21, seed=5)
    config, target, train, valid, test = H.build(root, "tiny-target", init_checkpoint=saved, stage1_epochs=0,
                                                 stage2_epochs=0)
    assert target.n_items != source.n_items
    assert all(torch.equal(v, source_state[k]) for k, v in target.state_dict().items())
    trainer = LaserTrainer(config, target)
    best, result = trainer.fit(train, valid, saved=True)  # zero-shot: nothing trained
    assert all(torch.equal(v, source_state[k]) for k, v in target.state_dict().items())
    assert target.item_matrix.size(0) == target.n_items and result and best == result["ndcg@10"]
    assert os.path.isfile(trainer.saved_model_file)
    assert set(trainer.evaluate(test, load_best_model=True)) == {"recall@10", "ndcg@10", "mrr@10"}

    # Low-resource: fine-tune from the same start on a fraction of the data.
    config, tuned, train, valid, _ = H.build(root, "tiny-target", init_checkpoint=saved, stage1_epochs=1,
                                             stage2_epochs=0, skip_stage2=True)
    LaserTrainer(config, tuned).fit(train, valid, saved=False)
    assert any(not torch.equal(v, source_state[k]) for k, v in tuned.state_dict().items())

    with pytest.raises(DataNotFoundError, match="init_checkpoint"):
        H.build(root, "tiny-target", init_checkpoint=str(root / "missing.pth"))
    with pytest.raises(ConfigError, match="does not fit this Laser"):
        H.build(root, "tiny-target", init_checkpoint=saved, n_query_tokens=3)
    with pytest.raises(ConfigError, match="no M-Former router bias .* set router_bias: False"):  # the paper's router
        H.build(root, "tiny-target", init_checkpoint=saved, router_bias=True)
    biased_state = dict(source_state, **{"prefix_module.router.bias": torch.zeros(source.prefix_module.n_experts)})
    with pytest.raises(RuntimeError, match="has an M-Former router bias .* set router_bias: True"):  # an older run's
        target.load_state_dict(biased_state)
    # No epochs and no init_checkpoint: the untrained model is evaluated (the benchmark's control row).
    config, fresh, train, valid, _ = H.build(root, "tiny-target", stage1_epochs=0, stage2_epochs=0)
    untrained = {k: v.clone() for k, v in fresh.state_dict().items()}
    best, result = LaserTrainer(config, fresh).fit(train, valid, saved=False)
    assert result and best == result["ndcg@10"]
    assert all(torch.equal(v, untrained[k]) for k, v in fresh.state_dict().items() if not k.startswith("item_tower."))
