"""Every cache records the inputs that made it: each cache is built once, then each input is changed in turn
(data file bytes, each config key that matters, the model file bytes, the package version) and the cache
must not be reused; with nothing changed it must be.

Caches: the converted LLM (GGUF -> safetensors), item texts (in memory, per dataset object), generated
knowledge (JSON), encoded vectors (safetensors), the frozen recommender of Laser and SeRALM's frozen base
(checkpoints), and Laser's item matrix (kept in the model and its checkpoints, keyed by parameter version).
"""

import os
import shutil
import sys
import warnings

import pytest
import torch

import recbole_llm
from recbole_llm.core import fingerprint
from recbole_llm.llm.gguf import convert_gguf
from recbole_llm.seralm import knowledge as K

from tests import helpers_laser, helpers_seralm
from tests.helpers_foundation import listdir_without_locks
from tests.helpers_llm import tiny_encoder
from tests.helpers_seralm import FakeGenerator

torch.set_num_threads(1)


def new_version(monkeypatch):
    monkeypatch.setattr(recbole_llm, "__version__", recbole_llm.__version__ + ".post1")


def fake_cuda_dtype(monkeypatch):
    """As if the run were on CUDA: the LLM/encoder would run in bf16 and produce other text/vectors."""
    monkeypatch.setattr(K, "default_dtype", lambda device, value="auto": torch.bfloat16)


def flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


def test_package_version_is_read_from_the_package(monkeypatch):
    assert fingerprint.package_version() == recbole_llm.__version__
    new_version(monkeypatch)
    assert fingerprint.package_version().endswith(".post1")


# ------------------------------------------------------------------------------------------ converted LLM
def test_converted_llm_keyed_by_gguf_bytes_and_versions(tmp_path, monkeypatch):
    import transformers

    from recbole_llm.llm.tiny import tiny_llm_dir

    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "cache"))
    reads = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(path, gguf_file=None, **kw):  # the GGUF "read" returns the tiny model, in milliseconds
        if gguf_file:
            reads.append(gguf_file)
        return real_model(tiny_llm_dir() if gguf_file else path, **kw)

    def tok_from(path, gguf_file=None, **kw):
        return real_tok(tiny_llm_dir() if gguf_file else path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from)
    gguf = tmp_path / "Model.gguf"
    gguf.write_bytes(b"fake gguf bytes, version A")

    first = convert_gguf(str(gguf))
    assert convert_gguf(str(gguf)) == first and len(reads) == 1  # unchanged: reused
    seen = {first}

    stat = os.stat(gguf)
    gguf.write_bytes(b"fake gguf bytes, version B")  # same size, mtime set back: the index must not be fooled
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = convert_gguf(str(gguf))
    assert changed not in seen and len(reads) == 2
    seen.add(changed)

    with monkeypatch.context() as m:
        new_version(m)
        assert convert_gguf(str(gguf)) not in seen and len(reads) == 3
    with monkeypatch.context() as m:
        # transformers may have replaced its lazy module in sys.modules since the import above
        current = sys.modules["transformers"]
        m.setattr(current, "__version__", current.__version__ + ".dev0")
        assert convert_gguf(str(gguf)) not in seen and len(reads) == 4
    assert convert_gguf(str(gguf)) == changed and len(reads) == 4  # back to the same inputs: reused


# --------------------------------------------------------------------------------------------- item texts
def _seralm_dataset(tmp_path, edit_title=False, **overrides):
    """(config, dataset) of the 12-item SeRALM dataset written under tmp_path; ``edit_title`` changes one
    title in the .item file before loading."""
    from recbole.data import create_dataset

    from recbole_llm.core.config import Config

    config = Config(model="SASRecSeRALM", dataset=helpers_seralm.DATASET,
                    config_dict=helpers_seralm.tiny_config_dict(tmp_path, **overrides), cmd_args=[])
    if edit_title:
        _edit_item_title(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config, create_dataset(config)


def _edit_item_title(config, old="Glass Beaker 250ml", new="Glass Beaker 500ml"):
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert old in text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def test_item_texts_keyed_by_dataset_and_text_settings(tmp_path):
    from recbole_llm.llm.item_text import item_texts

    config, dataset = _seralm_dataset(tmp_path)
    base = item_texts(dataset, config)
    assert item_texts(dataset, config) is base  # unchanged: the same cached list
    seen = [base]
    for key, value in (("item_text_fields", ["title", "brand"]), ("item_text_max_chars", 8),
                       ("item_text_display_names", {"brand": "maker"})):
        saved = config[key]
        config[key] = value
        texts = item_texts(dataset, config)
        assert all(texts != other for other in seen), key
        seen.append(texts)
        config[key] = saved
    title_only = item_texts(dataset, config, style="title")
    assert all(title_only != other for other in seen)
    assert item_texts(dataset, config) is base
    # new data file content -> a new dataset object -> its own texts (in memory only: no package version)
    config2, dataset2 = _seralm_dataset(tmp_path / "edited", edit_title=True)
    assert "Glass Beaker 500ml" in " ".join(item_texts(dataset2, config2))
    assert "Glass Beaker 500ml" not in " ".join(base)


# -------------------------------------------------------------------------------------- knowledge texts
def test_generated_knowledge_keyed_by_every_input(tmp_path, monkeypatch):
    from recbole_llm.llm.tiny import make_tiny_llm_dir

    llm_dir = make_tiny_llm_dir(tmp_path / "llm")
    config, dataset = _seralm_dataset(tmp_path, llm_path=llm_dir)

    def generated(cfg=config, data=dataset, adapter_version="base"):
        gen = FakeGenerator()
        K.generate_knowledge(data, cfg, adapter_version=adapter_version, generate_fn=gen, progress=False)
        return sum(len(b) for b in gen.batches)

    assert generated() == helpers_seralm.N_ITEMS
    assert generated() == 0  # unchanged: served from the cache

    other_llm = make_tiny_llm_dir(tmp_path / "llm-other", seed=1)
    for key, value in (("knowledge_max_new_tokens", 5), ("knowledge_repetition_penalty", 1.0),
                       ("llm_num_layers", 1), ("llm_path", other_llm), ("item_text_fields", ["title"]),
                       ("item_text_max_chars", 10)):
        saved = config[key]
        config[key] = value
        assert generated() == helpers_seralm.N_ITEMS, key
        config[key] = saved
    assert generated(adapter_version="aligned-step-1") == helpers_seralm.N_ITEMS
    with monkeypatch.context() as m:
        new_version(m)
        assert generated() == helpers_seralm.N_ITEMS
    with monkeypatch.context() as m:
        fake_cuda_dtype(m)
        assert generated() == helpers_seralm.N_ITEMS
    with monkeypatch.context() as m:
        m.setattr("recbole_llm.llm.prompts.knowledge_template_digest", lambda: "another prompt")
        assert generated() == helpers_seralm.N_ITEMS
    assert generated() == 0  # all inputs back: reused

    flip_last_byte(os.path.join(llm_dir, "model.safetensors"))  # same path, other weights
    assert generated() == helpers_seralm.N_ITEMS
    assert generated() == 0

    # the data file changes (one title): a new dataset whose item texts, hence knowledge, differ
    edited_config, edited = _seralm_dataset(tmp_path / "edited", edit_title=True, llm_path=llm_dir,
                                            knowledge_cache_dir=config["knowledge_cache_dir"])
    assert generated(cfg=edited_config, data=edited) == helpers_seralm.N_ITEMS


# ---------------------------------------------------------------------------------------- encoded vectors
def test_encoded_vectors_keyed_by_every_input(tmp_path, monkeypatch):
    import recbole_llm.llm.encode as encode
    from recbole_llm.llm.tiny import make_tiny_encoder_dir

    encoder_dir = make_tiny_encoder_dir(tmp_path / "encoder")
    config = {"dataset": "d", "knowledge_cache_dir": str(tmp_path / "knowledge"), "encoder_path": encoder_dir}
    calls = []
    real = encode.mean_pool_encode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(encode, "mean_pool_encode", counting)
    model = tiny_encoder()
    texts = ["", "a lab kit", "glass beaker set"]

    def encoded(cfg=config, items=texts):
        before = len(calls)
        K.encode_knowledge(items, cfg, encoder=model, progress=False)
        return len(calls) - before

    assert encoded() == 1 and encoded() == 0
    assert encoded(items=["", "a lab kit", "glass beaker sets"]) == 1
    assert encoded(cfg=dict(config, knowledge_encoder_max_length=16)) == 1
    assert encoded(cfg=dict(config, encoder_path=make_tiny_encoder_dir(tmp_path / "encoder-2", seed=1))) == 1
    with monkeypatch.context() as m:
        new_version(m)
        assert encoded() == 1
    with monkeypatch.context() as m:
        fake_cuda_dtype(m)
        assert encoded() == 1
    assert encoded() == 0
    flip_last_byte(os.path.join(encoder_dir, "model.safetensors"))
    assert encoded() == 1 and encoded() == 0


# --------------------------------------------------------------------------- frozen recommenders (SR, base)
@pytest.fixture
def captured_cache_file(monkeypatch):
    """Replace the train-or-load step by a stub that records the cache file it was given."""
    import recbole_llm.core.cached_recommender as cached_recommender

    files = []

    def stub(sr_config, dataset, given, key, cache_file, show_progress=False, trust=False):
        files.append(cache_file)
        recommender = torch.nn.Linear(1, 1)
        recommender.hidden_size = 1
        return recommender

    monkeypatch.setattr(cached_recommender, "trained_recommender", stub)
    return files


def _edit_first_interaction(data_folder, name):
    path = os.path.join(data_folder, f"{name}.inter")
    with open(path) as f:
        lines = f.readlines()
    user, item, time = lines[1].rstrip("\n").split("\t")
    lines[1] = f"{user}\t{item}\t{float(time) + 0.5}\n"
    with open(path, "w") as f:
        f.writelines(lines)


@pytest.fixture(scope="module")
def laser(tmp_path_factory):
    """(config, model) of a tiny Laser, its frozen SR trained once into checkpoint_dir/frozen_sr."""
    config, model, *_ = helpers_laser.build(tmp_path_factory.mktemp("laser"), frozen_sr_epochs=1)
    return config, model


def test_frozen_sr_trained_once_then_reused(laser, monkeypatch):
    """The real path: trained with RecBole on a miss, loaded (not retrained) on a hit."""
    from recbole_llm.core import cached_recommender
    from recbole_llm.laser import frozen_sr
    from recbole_llm.laser import trainer as laser_trainer
    config, model = laser
    folder = os.path.join(config["checkpoint_dir"], "frozen_sr")
    assert len(listdir_without_locks(folder)) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached frozen SR must not be retrained")

    monkeypatch.setattr(cached_recommender, "train_frozen_sr", no_training)
    laser_trainer.prepare_frozen_sr(config)
    again = frozen_sr.build_frozen_sr(config, _laser_dataset(config))
    assert again.loaded
    for a, b in zip(model.frozen_sr.parameters(), again.parameters()):
        assert torch.equal(a, b)


def _laser_dataset(config):
    from recbole.data import create_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_dataset(config)


def test_frozen_sr_cache_keyed_by_every_input(tmp_path, monkeypatch):
    from recbole_llm.core.config import Config
    from recbole_llm.laser.frozen_sr import frozen_sr_weights_file

    name = "tiny-laser"
    helpers_laser.write_tiny_dataset(tmp_path, name)

    def cache_file(**overrides):
        config = Config(model="Laser", dataset=name, config_dict=helpers_laser.tiny_config_dict(tmp_path, name, **overrides),
                        cmd_args=[])
        return frozen_sr_weights_file(config)

    base = cache_file()
    assert cache_file() == base and os.path.basename(base).startswith(f"BERT4Rec-{name}-")
    seen = {base}
    for change in ({"frozen_sr_model": "SASRec"}, {"frozen_sr_hidden_size": 8}, {"frozen_sr_n_layers": 1},
                   {"frozen_sr_epochs": 3}, {"frozen_sr_learning_rate": 0.002}, {"frozen_sr_batch_size": 32},
                   {"seed": 7}, {"MAX_ITEM_LIST_LENGTH": 6}, {"valid_metric": "MRR@10"},
                   {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"}},
                   {"user_inter_num_interval": "[6,inf)"}, {"TIME_FIELD": None,
                                                           "load_col": {"inter": ["user_id", "item_id"],
                                                                        "item": ["item_id", "title", "brand", "categories"]}}):
        changed = cache_file(**change)
        assert changed not in seen, change
        seen.add(changed)
    # not inputs: where checkpoints go, logging, progress bars, reported metrics
    assert os.path.basename(cache_file(checkpoint_dir=str(tmp_path / "elsewhere"), state="INFO", show_progress=True,
                                       metrics=["Recall", "NDCG"])) == os.path.basename(base)
    with monkeypatch.context() as m:
        new_version(m)
        assert cache_file() not in seen
    _edit_first_interaction(os.path.join(tmp_path, name), name)
    assert cache_file() not in seen


def test_frozen_base_cache_keyed_by_every_input(tmp_path, monkeypatch, captured_cache_file):
    from tests.helpers_alignment import tiny_config

    from recbole_llm.seralm.alignment.trainer import load_frozen_base

    def cache_file(**overrides):
        load_frozen_base(tiny_config("SASRecSeRALM", tmp_path, **overrides), None)
        return captured_cache_file[-1]

    base = cache_file()
    assert cache_file() == base and os.path.basename(base).startswith("SASRec-tinyalign-")
    seen = {base}
    for change in ({"hidden_size": 8}, {"n_layers": 2}, {"frozen_base_epochs": 2}, {"learning_rate": 0.002},
                   {"train_batch_size": 16}, {"seed": 7}, {"MAX_ITEM_LIST_LENGTH": 5}):
        changed = cache_file(**change)
        assert changed not in seen, change
        seen.add(changed)
    with monkeypatch.context() as m:
        new_version(m)
        assert cache_file() not in seen
    # the data file's bytes: a private copy of the shared tiny dataset, edited
    from tests.helpers_alignment import TINY_DATASET, tiny_data_root

    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_data_root(), TINY_DATASET), data / TINY_DATASET)
    moved = cache_file(data_path=str(data))
    assert os.path.basename(moved) == os.path.basename(base)  # same bytes elsewhere: same key
    _edit_first_interaction(str(data / TINY_DATASET), TINY_DATASET)
    assert cache_file(data_path=str(data)) not in seen


# ---------------------------------------------------------------------------------------- Laser item matrix
def test_laser_item_matrix_follows_the_weights(laser):
    """The item matrix is reused only while the weights that made it are unchanged; a checkpoint carries the
    matrix with the weights (other_parameter), so loading one never pairs new weights with an old matrix."""
    config, model = laser
    assert model.refresh_item_matrix(show_progress=False) is True
    assert model.refresh_item_matrix(show_progress=False) is False  # unchanged weights: reused
    saved = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()},  # as a checkpoint would hold
             "other_parameter": dict(model.other_parameter())}
    saved_matrix = model.item_matrix.clone()

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    model.mark_parameters_updated()
    assert model.refresh_item_matrix(show_progress=False) is True  # weights changed: recomputed
    assert not torch.equal(model.item_matrix, saved_matrix)

    model.load_state_dict(saved["state_dict"])
    model.load_other_parameter(saved["other_parameter"])
    assert torch.equal(model.item_matrix, saved_matrix)
    assert model.refresh_item_matrix(show_progress=False) is False
    assert torch.allclose(model.item_matrix, saved_matrix)
    model.refresh_item_matrix(force=True, show_progress=False)  # the carried matrix is the weights' own
    assert torch.allclose(model.item_matrix, saved_matrix, atol=1e-5)
