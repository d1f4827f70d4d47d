"""Registration, config merge, checkpoint safety and the CLI on a tiny SASRec."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import recbole_llm
from recbole_llm.core.checkpoint import load_checkpoint
from recbole_llm.core.config import Config
from recbole_llm.core.registry import PLUGIN_MODELS, PLUGIN_TRAINERS
from recbole_llm.run.quick_start import run_recbole_llm
from tests.helpers_foundation import tiny_sasrec_config

NO_NEG = {"train_neg_sample_args": None}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_recbole_finds_every_plugin_model_and_trainer():
    from recbole.utils import get_model, get_trainer

    assert PLUGIN_MODELS, "no plugin model registered"
    for name in PLUGIN_MODELS:
        cls = get_model(name)
        assert cls.__name__ == name
        assert cls is recbole_llm.get_model(name)
    for name, (_, trainer_name) in PLUGIN_TRAINERS.items():
        assert get_trainer(get_model(name).type, name).__name__ == trainer_name


def test_plugin_get_model_falls_back_to_recbole_and_names_unknown_models():
    from recbole.model.sequential_recommender import SASRec

    assert recbole_llm.get_model("SASRec") is SASRec
    with pytest.raises(ValueError, match="NoSuchModel"):
        recbole_llm.get_model("NoSuchModel")


def test_recbole_models_get_a_safe_checkpoint_trainer():
    from recbole.utils import ModelType

    from recbole_llm.core.safe_trainer import SafeCheckpointMixin

    trainer = recbole_llm.get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert issubclass(trainer, SafeCheckpointMixin)
    assert trainer is recbole_llm.get_trainer(ModelType.SEQUENTIAL, "SASRec")


def test_config_merges_plugin_yaml_below_user_values(tmp_path, monkeypatch):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "SASRec.yaml").write_text("plugin_only_key: 7\nhidden_size: 24\n")
    monkeypatch.setattr("recbole_llm.core.keys.PLUGIN_YAML_ROOT", str(tmp_path))
    config = Config("SASRec", "ml-100k", config_dict={"hidden_size": 32, "train_neg_sample_args": None}, cmd_args=[])
    assert config["plugin_only_key"] == 7
    assert config["hidden_size"] == 32  # the user's value wins over the plugin default


def test_config_ignores_pytest_argv_but_reads_given_args(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--foreign_flag=1", "-q"])
    assert "foreign_flag" not in Config("SASRec", "ml-100k", config_dict=NO_NEG).final_config_dict
    config = Config("SASRec", "ml-100k", config_dict=NO_NEG, cmd_args=["--hidden_size=48"])
    assert config["hidden_size"] == 48


def test_config_ignores_python_m_pytest_argv(monkeypatch):
    # Found by review: under `python -m pytest` argv[0] is .../pytest/__main__.py and its flags became keys.
    monkeypatch.setattr(sys, "argv", [os.path.join("site-packages", "pytest", "__main__.py"), "--tb=short", "-q"])
    assert "tb" not in Config("SASRec", "ml-100k", config_dict=NO_NEG).final_config_dict


def test_recbole_encoding_key_is_accepted_for_plugin_models():
    # RecBole's documented data setting `encoding` (read by its Dataset) was an unknown key for plugin models.
    config = Config("PAUP", "ml-100k", config_dict={"encoding": "latin-1"}, cmd_args=[])
    assert config["encoding"] == "latin-1"


@pytest.mark.parametrize("user, expected", [({}, "cuda"), ({"use_gpu": False}, "cpu"), ({"device": "cpu"}, "cpu"),
                                            ({"gpu_id": ""}, "cpu")])
def test_config_device_honours_use_gpu_and_device_on_a_cuda_machine(monkeypatch, user, expected):
    # RecBole 1.2 alone gives cuda for the first three (found on an H200: tiny-model tests with use_gpu=False
    # got a CUDA LLM beside a CPU model). Only is_available is faked: Config creates no CUDA tensor.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))  # RecBole sets it
    config = Config("SASRec", "ml-100k", config_dict=dict(NO_NEG, **user), cmd_args=[])
    assert config["device"].type == expected


def test_numpy_aliases_exist_after_config():
    Config("SASRec", "ml-100k", config_dict=NO_NEG, cmd_args=[])
    assert np.float is np.float64 or np.float is float
    assert np.dtype(np.int) == np.dtype(np.int_)


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sasrec")
    result = run_recbole_llm("SASRec", "ml-100k", config_dict=tiny_sasrec_config(tmp), cmd_args=[])
    return result


def test_run_evaluates_best_model_from_safe_checkpoint(sasrec_run):
    # run_recbole_llm calls RecBole's evaluate(load_best_model=True), which uses plain torch.load
    assert set(sasrec_run["test_result"]) >= {"recall@10", "ndcg@10"}
    checkpoint = torch.load(sasrec_run["saved_model_file"], weights_only=True)
    assert checkpoint["config"]["model"] == "SASRec"
    # how far it trained, for the benchmark's "best epoch is not the last" check
    assert sasrec_run["epochs_run"] >= 1 and sasrec_run["best_epoch"] == checkpoint["epoch"]


def test_recbole_load_data_and_model_reads_plugin_checkpoint(sasrec_run):
    from recbole.quick_start import load_data_and_model

    config, model, _, _, _, test_data = load_data_and_model(sasrec_run["saved_model_file"])
    from recbole.trainer import Trainer

    result = Trainer(config, model).evaluate(test_data, load_best_model=False)
    assert result["ndcg@10"] == pytest.approx(sasrec_run["test_result"]["ndcg@10"], abs=1e-4)


def test_resume_continues_after_saved_epoch(sasrec_run):
    from recbole_llm.core.lookup import get_trainer
    from recbole_llm.run.quick_start import load_data_and_model

    config, model, *_ = load_data_and_model(sasrec_run["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.resume_checkpoint(sasrec_run["saved_model_file"])
    assert trainer.start_epoch == 1


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "created_by_unpickling"
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "payload": _Boom(str(target))}, bad)
    with pytest.raises(RuntimeError, match="trust_pickled_code"):
        load_checkpoint(str(bad))
    assert not target.exists()


def test_checkpoint_saved_before_the_core_folder_still_loads(tmp_path, monkeypatch):
    """A checkpoint pickles the plugin's Config by module path; files written when it was recbole_llm.config load."""
    import types
    import zipfile

    config = Config("SASRec", "ml-100k", config_dict=NO_NEG, cmd_args=[])
    old_module = types.ModuleType("recbole_llm.config")
    old_module.Config = Config
    monkeypatch.setitem(sys.modules, "recbole_llm.config", old_module)
    monkeypatch.setattr(Config, "__module__", "recbole_llm.config")
    path = tmp_path / "old.pth"
    torch.save({"config": config, "state_dict": {}}, path)
    monkeypatch.undo()
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    assert b"recbole_llm.config\nConfig" in pickled  # the old path, as such a file holds it
    assert load_checkpoint(str(path))["config"]["model"] == "SASRec"


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_llm.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_a_recbole_model(tmp_path):
    proc = _cli("--model=SASRec", "--dataset=ml-100k", "--epochs=1", "--hidden_size=16", "--inner_size=16",
                "--n_layers=1", "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=512",
                f"--checkpoint_dir={tmp_path}/saved", "--show_progress=False", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "test result" in out and "ndcg@10" in out
    assert "config files: [" in out and "ml-100k.yaml" in out and "(profile cpu)" in out  # README promises it
    assert any(name.startswith("SASRec-") for name in os.listdir(tmp_path / "saved"))
    assert os.path.isdir(tmp_path / "log")


def test_cli_rejects_unknown_model_and_dataset(tmp_path):
    proc = _cli("--model=NoSuchModel", "--dataset=ml-100k", cwd=str(tmp_path))
    assert proc.returncode != 0 and "NoSuchModel" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("--model=SASRec", "--dataset=no-such-data", cwd=str(tmp_path))
    assert proc.returncode != 0 and "no-such-data" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model, sampled", [("BPR", True), ("SASRec", False)])
def test_dataset_yaml_keeps_pairwise_sampling_for_bpr(model, sampled):
    # The dataset YAML the CLI puts first once set train_neg_sample_args: ~ for every model, so BPR got no
    # negatives and crashed on 'neg_item_id' (found by review). CE sequential models still get none.
    from recbole_llm.core.locate import default_config_files

    files = default_config_files(model, "ml-100k", "none")
    assert files and files[0].endswith(os.path.join("properties", "dataset", "ml-100k.yaml"))
    config = Config(model=model, dataset="ml-100k", config_file_list=files, cmd_args=[])
    args = config["train_neg_sample_args"]
    if sampled:
        assert args["distribution"] == "uniform" and args["sample_num"] >= 1
    else:
        assert args is None or args.get("distribution") == "none"


def test_cpu_long_profile_is_the_cpu_profile_then_its_differences():
    from recbole_llm.core.locate import default_config_files

    files = default_config_files("Laser", "amazon-scientific", "cpu-long")
    assert [os.path.basename(f) for f in files] == ["amazon-scientific.yaml", "Laser-cpu.yaml", "Laser-cpu-long.yaml"]
    # a model without a long profile gets its cpu profile only
    files = default_config_files("SASRecSeRALM", "amazon-scientific", "cpu-long")
    assert [os.path.basename(f) for f in files] == ["amazon-scientific.yaml", "SASRecSeRALM-cpu.yaml"]


def _save_tagged_cuda(obj, path, monkeypatch):
    """torch.save as on a GPU machine: every storage is tagged cuda:0 (no GPU needed to write it)."""
    import torch.serialization

    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


def test_gpu_checkpoint_loads_on_a_cpu_machine(sasrec_run, tmp_path, monkeypatch):
    # Found by review: a valid GPU checkpoint was called "damaged ... Delete it" on a CPU-only machine.
    from recbole_llm.run.quick_start import load_data_and_model

    checkpoint = torch.load(sasrec_run["saved_model_file"], weights_only=True)
    checkpoint["config"]["device"] = torch.device("cuda")
    path = str(tmp_path / "gpu.pth")
    _save_tagged_cuda(checkpoint, path, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in loaded["state_dict"].values())
    config, model, *_ = load_data_and_model(path)
    assert config["device"].type == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_checkpoint_runtime_error_that_is_not_damage_keeps_its_text(tmp_path, monkeypatch):
    from recbole_llm.core.errors import CorruptFileError

    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, path)

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        load_checkpoint(str(path), map_location="cuda:0")
    assert not isinstance(info.value, CorruptFileError)


def test_console_script_entry_point_returns_none_after_a_run(monkeypatch):
    # The generated wrapper runs sys.exit(<entry>()): a returned result dict was printed to stderr with exit
    # status 1 after a successful run (found by review).
    import configparser
    import importlib

    import recbole_llm.run.quick_start as quick_start

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = {name.strip(): target.strip() for name, target in (line.split("=", 1) for line in lines)}
    module, func = scripts["recbole-llm"].split(":")
    entry = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(quick_start, "run_recbole_llm", lambda *a, **k: {"best_valid_score": 0.1})
    assert entry(["--model=SASRec", "--dataset=ml-100k"]) is None


def test_runs_started_in_the_same_second_get_their_own_checkpoint():
    """Two runs named after the same second once shared (and deleted) one file; the name now carries the process
    id, and a count when one process builds several trainers in that second."""
    from recbole_llm.core.safe_trainer import unique_checkpoint_name

    first = unique_checkpoint_name("saved/SASRec-Dec-02-2026_21-35-54.pth")
    second = unique_checkpoint_name("saved/SASRec-Dec-02-2026_21-35-54.pth")
    assert first == f"saved/SASRec-Dec-02-2026_21-35-54-{os.getpid()}.pth"
    assert second == f"saved/SASRec-Dec-02-2026_21-35-54-{os.getpid()}-2.pth"
