"""Bad input through the CLI: each case exits non-zero with a message naming what is wrong, prints no
traceback, and writes nothing (no log, checkpoint, cache or data file).

Most cases call the CLI's ``main()`` in this process (it must end in ``SystemExit("error: ...")``, which the
interpreter prints without a traceback); a few run the real command in a subprocess end to end.
"""

import glob
import os
import subprocess
import sys

import pytest
import torch
import yaml

from recbole_llm.llm.tiny import tiny_encoder_dir, tiny_llm_dir
from tests.helpers_seralm import DATASET, tiny_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree(root):
    """Every file and folder under ``root`` with its size (folders: -1)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = -1
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.path.getsize(path)
    return found


class Workspace:
    """A tiny SeRALM dataset, a config file, an empty working directory and an empty cache directory."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.config = tiny_config_dict(tmp_path)
        self.data_dir = os.path.join(self.config["data_path"], DATASET)
        self.run_dir = tmp_path / "run"
        self.cache_dir = tmp_path / "cache"
        self.run_dir.mkdir()

    def path(self, suffix):
        return os.path.join(self.data_dir, f"{DATASET}.{suffix}")

    def rewrite(self, suffix, edit):
        with open(self.path(suffix), encoding="utf-8") as f:
            text = f.read()
        with open(self.path(suffix), "w", encoding="utf-8") as f:
            f.write(edit(text))

    def _write_config(self):
        config_file = self.root / "run.yaml"
        config_file.write_text(yaml.safe_dump(self.config))
        return config_file

    def main(self, monkeypatch, model, *flags):
        """``main()`` in this process; returns (exit message, files written)."""
        from recbole_llm.run.cli import main

        config_file = self._write_config()
        before = _tree(self.root)
        monkeypatch.chdir(self.run_dir)
        monkeypatch.setenv("RECBOLE_LLM_CACHE", str(self.cache_dir))
        monkeypatch.delenv("RECBOLE_LLM_DEBUG", raising=False)
        with pytest.raises(SystemExit) as exit_info:
            main([f"--model={model}", f"--dataset={DATASET}", f"--config_files={config_file}", *flags])
        written = {k: v for k, v in _tree(self.root).items() if before.get(k) != v}
        return str(exit_info.value.code), written

    def run(self, model, *flags):
        """The real command in a subprocess; returns (CompletedProcess, files written)."""
        config_file = self._write_config()
        before = _tree(self.root)
        env = dict(os.environ, RECBOLE_LLM_CACHE=str(self.cache_dir), OMP_NUM_THREADS="1")
        env.pop("RECBOLE_LLM_DEBUG", None)
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "run_recbole_llm.py"), f"--model={model}", f"--dataset={DATASET}",
             f"--config_files={config_file}", *flags],
            cwd=self.run_dir, env=env, capture_output=True, text=True, timeout=300)
        written = {k: v for k, v in _tree(self.root).items() if before.get(k) != v}
        return proc, written


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


def _header_without_type(text):
    return text.replace("user_id:token", "user_id", 1)


def _bad_float(text):
    lines = text.splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:2] + ["yesterday"])
    return "\n".join(lines) + "\n"


def _short_row(text):
    lines = text.splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:2])
    return "\n".join(lines) + "\n"


def _drop_title_column(text):
    rows = [line.split("\t") for line in text.splitlines()]
    return "\n".join("\t".join(r[:1] + r[2:]) for r in rows) + "\n"


DATA_CASES = {
    # name: (file, edit or None to delete, expected message)
    "missing_inter": ("inter", None, f"{DATASET}.inter"),
    "empty_inter": ("inter", lambda text: "", "is empty"),
    "header_without_type": ("inter", _header_without_type, "header column 'user_id' has no type"),
    "unknown_type": ("inter", lambda t: t.replace("timestamp:float", "timestamp:date"), "has type 'date'"),
    "not_a_number": ("inter", _bad_float, "timestamp:float is 'yesterday', not a number"),
    "short_row": ("inter", _short_row, "has 2 columns; the header has 3"),
    "no_user_column": ("inter", lambda t: t.replace("user_id:token", "uid:token", 1), "no USER_ID_FIELD column 'user_id'"),
    "missing_item_file": ("item", None, f"{DATASET}.item' does not exist"),
    "no_title_field": ("item", _drop_title_column, "no title-like field"),
}


def _assert_rejected(exit_message, written, message):
    assert exit_message.startswith("error: "), exit_message
    assert message in exit_message, exit_message
    assert not written, f"files written by a rejected run: {written}"


def _assert_command_rejected(proc, written, message):
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert message in output, output
    assert not written, f"files written by a rejected run: {written}"


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_atomic_files(ws, monkeypatch, case):
    suffix, edit, message = DATA_CASES[case]
    if edit is None:
        os.remove(ws.path(suffix))
    else:
        ws.rewrite(suffix, edit)
    _assert_rejected(*ws.main(monkeypatch, "SASRecSeRALM"), message)


CONFIG_CASES = {
    # name: (model, flags, expected message)
    "unknown_key": ("SASRecSeRALM", ["--knowledge_proj_sise=4"], "knowledge_proj_size"),
    "zero_experts": ("Laser", ["--n_experts=0"], "n_experts"),
    "zero_tau": ("Laser", ["--temperature=0"], "temperature"),
    "zero_query_tokens": ("Laser", ["--n_query_tokens=0"], "n_query_tokens"),
    "negative_lambda": ("Laser", ["--lb_weight=-0.1"], "lb_weight"),
    "negative_alpha": ("SASRecSeRALM", ["--alpha=-1.0"], "alpha"),
    "zero_refresh_every": ("SASRecSeRALM", ["--refresh_every=0"], "refresh_every"),
    "missing_llm": ("SASRecSeRALM", ["--llm_path=/no/such/llm"], "llm_path '/no/such/llm' does not exist"),
    "missing_encoder": ("SASRecSeRALM", ["--encoder_path=/no/such/encoder"],
                        "encoder_path '/no/such/encoder' does not exist"),
    "encoder_as_llm": ("SASRecSeRALM", [f"--llm_path={tiny_encoder_dir()}"], "holds a 'bert' model"),
    "llm_as_encoder": ("SASRecSeRALM", [f"--encoder_path={tiny_llm_dir()}"], "generative model"),
    "encoder_width": ("SASRecSeRALM", ["--knowledge_text_dim=999"], "knowledge_text_dim=999"),
    "ray_unreachable": ("SASRecSeRALM", ["--alignment=True", "--generator_mode=ray", "--ray_address=127.0.0.1:9"],
                        "ray_address '127.0.0.1:9' is unreachable"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(ws, monkeypatch, case):
    model, flags, message = CONFIG_CASES[case]
    _assert_rejected(*ws.main(monkeypatch, model, *flags), message)


def test_file_that_is_not_a_gguf_model(ws, monkeypatch):
    fake = ws.root / "model.gguf"
    fake.write_bytes(b"this is not a GGUF file")
    _assert_rejected(*ws.main(monkeypatch, "SASRecSeRALM", f"--llm_path={fake}"), "not a GGUF model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_without_cuda(ws, monkeypatch):
    _assert_rejected(*ws.main(monkeypatch, "SASRec", "--device=cuda"), "asks for CUDA")


@pytest.mark.parametrize("model, flags, edit, message", [
    ("SASRecSeRALM", [], ("inter", lambda text: ""), "is empty"),
    ("Laser", ["--n_experts=0"], None, "n_experts"),
    ("SASRecSeRALM", ["--alignment=True", "--generator_mode=ray", "--ray_address=127.0.0.1:9"], None,
     "is unreachable"),
])
def test_the_command_exits_with_the_message_and_no_traceback(ws, model, flags, edit, message):
    if edit:
        ws.rewrite(*edit)
    _assert_command_rejected(*ws.run(model, *flags), message)


def _damage_knowledge_json(folder):
    (path,) = glob.glob(os.path.join(folder, "knowledge-*.json"))
    with open(path, "w") as f:
        f.write('{"texts": ["cut off')


def _damage_knowledge_partial(folder):
    (path,) = glob.glob(os.path.join(folder, "knowledge-*.json"))
    os.remove(path)  # back to "generation in progress", with a damaged first line
    with open(path[:-len(".json")] + ".partial.jsonl", "w") as f:
        f.write('not json\n{"ids": [1], "texts": ["x"]}\n')


def _damage_vectors(folder):
    (path,) = glob.glob(os.path.join(folder, "vectors-*.safetensors"))
    with open(path, "wb") as f:
        f.write(b"garbage")


@pytest.mark.parametrize("damage, message", [
    (_damage_knowledge_json, "is corrupt"),
    (_damage_knowledge_partial, "line 1 is corrupt"),
    (_damage_vectors, "cannot be read"),
])
def test_corrupt_cache_file_is_named_and_nothing_is_written(ws, monkeypatch, damage, message):
    from recbole_llm.run.cli import main

    monkeypatch.chdir(ws.run_dir)
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(ws.cache_dir))
    main(["--model=SASRecSeRALM", f"--dataset={DATASET}", f"--config_files={ws._write_config()}"])  # fills caches
    damage(ws.config["knowledge_cache_dir"])
    exit_message, written = ws.main(monkeypatch, "SASRecSeRALM")
    _assert_rejected(exit_message, written, message)
    assert "delete" in exit_message


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    from recbole_llm.core.checkpoint import atomic_torch_save, load_checkpoint
    from recbole_llm.core.errors import CorruptFileError

    path = str(tmp_path / "model.pth")
    atomic_torch_save({"state_dict": {"w": torch.ones(64, 64)}}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptFileError, match="cannot be read"):
        load_checkpoint(path)


def test_a_dataset_recbole_downloads_itself_is_left_to_recbole(tmp_path):
    from recbole_llm.core.config import Config
    from recbole_llm.core.locate import check_dataset_available
    from recbole_llm.run.preflight import check_run_inputs

    config = Config("SASRec", "ml-1m", config_dict={"data_path": str(tmp_path)}, cmd_args=[])
    check_dataset_available(config)  # ml-1m is in RecBole's url.yaml: RecBole fetches it at create_dataset
    check_run_inputs(config)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- --config_files (found by review: tracebacks)

def _main_config_files(monkeypatch, tmp_path, value):
    from recbole_llm.run.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECBOLE_LLM_DEBUG", raising=False)
    before = set(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model=SASRec", "--dataset=ml-100k", f"--config_files={value}"])
    assert set(os.listdir(tmp_path)) == before  # nothing written (no log/ or saved/)
    return str(exit_info.value.code)


@pytest.mark.parametrize("name, text, expected", [
    ("missing.yaml", None, "does not exist"),
    ("broken.yaml", "epochs: 1\n  bad: [1, 2\n", "not valid YAML"),
    ("list.yaml", "- epochs\n- 1\n", "expected a mapping"),
])
def test_bad_config_file_is_named_in_a_clear_error(monkeypatch, tmp_path, name, text, expected):
    if text is not None:
        (tmp_path / name).write_text(text)
    message = _main_config_files(monkeypatch, tmp_path, name)
    assert message.startswith("error:") and name in message and expected in message


def test_empty_config_file_counts_as_no_settings(tmp_path):
    from recbole_llm.run.quick_start import build_config

    empty, comments = tmp_path / "empty.yaml", tmp_path / "comments.yaml"
    empty.write_text("")
    comments.write_text("# nothing set yet\n")
    config = build_config("SASRec", "ml-100k", [str(empty), str(comments)], cmd_args=[])
    assert config["model"] == "SASRec"


def test_config_files_split_on_any_whitespace(monkeypatch, tmp_path):
    import recbole_llm.run.quick_start as quick_start
    from recbole_llm.run.cli import main

    seen = {}
    monkeypatch.setattr(quick_start, "run_recbole_llm", lambda model, dataset, files, **kw: seen.update(files=files))
    main(["--model=SASRec", "--dataset=ml-100k", "--config_files= a.yaml  b.yaml\tc.yaml "])
    assert seen["files"] == ["a.yaml", "b.yaml", "c.yaml"]
