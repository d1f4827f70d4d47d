"""LLM work on 2 local Ray workers (tiny LLM and encoder): the output equals one process's, a lost worker's batch
is redone by the other, and when every worker is lost a rerun generates only the missing batches."""

import warnings

import pytest
import torch

import recbole_llm  # noqa: F401
from recbole_llm.llm import workers as W
from recbole_llm.seralm import knowledge as K
from tests.helpers_seralm import DATASET, tiny_config_dict

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (starting it costs seconds), shut down at the end."""
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as err:  # pragma: no cover - machine-specific
        pytest.skip(f"ray could not start here: {err}")
    yield
    ray.shutdown()


def tiny(tmp_path, **overrides):
    from recbole.data import create_dataset

    from recbole_llm.core.config import Config

    config = Config(model="SASRecSeRALM", dataset=DATASET, cmd_args=[],
                    config_dict=tiny_config_dict(tmp_path, knowledge_batch_size=3, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config, create_dataset(config)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Texts and vectors of one process (the reference)."""
    torch.set_num_threads(1)  # the workers' thread count: the same arithmetic
    config, dataset = tiny(tmp_path_factory.mktemp("single"))
    texts = K.generate_knowledge(dataset, config, progress=False)
    return texts, K.encode_knowledge(texts, config, progress=False)


def test_two_workers_generate_and_encode_what_one_process_does(ray_local, single, tmp_path, monkeypatch):
    monkeypatch.setattr(K, "ENCODE_SHARD", 5)  # 13 rows: 3 shards over 2 workers
    config, dataset = tiny(tmp_path, llm_workers=2)
    texts = K.generate_knowledge(dataset, config, progress=False)
    assert texts == single[0]
    vectors = K.encode_knowledge(texts, config, progress=False)
    torch.testing.assert_close(vectors, single[1], rtol=1e-4, atol=1e-5)


@pytest.fixture
def kill_after_first_batch(monkeypatch):
    """``arm(which)``: after the first stored batch, kill the pool's actors ``which`` (a slice); returns the ids of
    every stored batch, in order."""
    pools, stored = [], []
    start, append = W.WorkerPool.__init__, K.KnowledgeCache.append_batch

    def keep(self, *args, **kwargs):
        start(self, *args, **kwargs)
        pools.append(self)

    def arm(which):
        stored.clear()

        def append_then_kill(self, ids, texts):
            append(self, ids, texts)
            stored.append(list(ids))
            if which is not None and len(stored) == 1:
                for actor in pools[-1].actors[which]:
                    ray.kill(actor)

        monkeypatch.setattr(K.KnowledgeCache, "append_batch", append_then_kill)
        return stored

    monkeypatch.setattr(W.WorkerPool, "__init__", keep)
    return arm


def test_a_lost_workers_batches_are_done_by_the_other(ray_local, single, tmp_path, kill_after_first_batch):
    stored = kill_after_first_batch(slice(0, 1))
    config, dataset = tiny(tmp_path, llm_workers=2)
    assert K.generate_knowledge(dataset, config, progress=False) == single[0]
    assert sorted(i for ids in stored for i in ids) == list(range(1, len(single[0])))  # every item once


def test_rerun_after_every_worker_is_lost_generates_only_the_rest(ray_local, single, tmp_path, kill_after_first_batch):
    stored = kill_after_first_batch(slice(None))
    config, dataset = tiny(tmp_path, llm_workers=2)
    with pytest.raises(W.WorkersLost, match="rerun to do only the rest"):
        K.generate_knowledge(dataset, config, progress=False)
    first = [i for ids in stored for i in ids]
    assert 0 < len(first) < len(single[0]) - 1

    stored = kill_after_first_batch(None)
    assert K.generate_knowledge(dataset, config, progress=False) == single[0]
    again = sorted(i for ids in stored for i in ids)
    assert again == sorted(set(range(1, len(single[0]))) - set(first))


def test_worker_settings_are_checked():
    from recbole_llm.core.errors import ConfigError

    assert W.worker_settings({"llm_workers": 2, "llm_worker_cpus": 1, "llm_worker_gpus": 0})[:3] == (2, 1, 0)
    with pytest.raises(ConfigError, match="llm_workers must be an integer >= 1"):
        W.worker_settings({"llm_workers": 0})
    with pytest.raises(ConfigError, match="llm_worker_gpus"):
        W.worker_settings({"llm_worker_gpus": -1})


def test_laser_item_refresh_on_two_workers_equals_one_process(ray_local, tmp_path):
    """Stage 1 and a stage-2 state (frozen item side): the matrix of 2 workers is the one of this process."""
    from tests import helpers_laser

    torch.set_num_threads(1)
    helpers_laser.seeded(0)
    _, single, *_ = helpers_laser.build(tmp_path, encode_batch_size=4)
    helpers_laser.seeded(0)
    _, pooled, *_ = helpers_laser.build(tmp_path, encode_batch_size=4, llm_workers=2)
    pooled.load_state_dict(single.state_dict())
    try:
        for stage in (1, 2):
            if stage == 2:
                with torch.no_grad():
                    single.suffix.add_(0.5)
                single.freeze_item_side()  # a stage-2 state: its item side is the frozen tower
                with torch.no_grad():
                    single.suffix.add_(1.0)  # the user side moves on; items must still use the tower
                pooled.load_state_dict(single.state_dict())
            single.refresh_item_matrix(force=True, show_progress=False)
            pooled.refresh_item_matrix(force=True, show_progress=False)
            assert pooled._item_workers is not None and len(pooled._item_workers.actors) == 2
            torch.testing.assert_close(pooled.item_matrix, single.item_matrix, rtol=1e-4, atol=1e-5)
    finally:
        pooled.close_item_workers()
