"""Issue 5: hyperopt and Ray Tune searches, and 2-process gloo DDP, each on a tiny SASRec."""

import os
import subprocess
import sys

import pytest

from recbole_llm.hyper import read_hyper_file, run_hyperopt
from recbole_llm.errors import ConfigError
from tests.helpers_foundation import tiny_sasrec_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HYPER = os.path.join(REPO, "tests", "data", "sasrec_tiny.hyper")


def test_hyper_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.hyper"
    bad.write_text("learning_rate gaussian 0,1\n")
    with pytest.raises(ConfigError, match="bad.hyper:1"):
        read_hyper_file(str(bad))
    assert read_hyper_file(HYPER) == [("learning_rate", "choice", [0.001, 0.01])]


def test_hyperopt_exhaustive_two_trials(tmp_path):
    out = tmp_path / "result.md"
    tuner = run_hyperopt("SASRec", "ml-100k", HYPER, algo="exhaustive", output_file=str(out),
                         config_dict=tiny_sasrec_config(tmp_path))
    assert len(tuner.params2result) == 2
    table = out.read_text()
    assert "learning_rate" in table and "test_ndcg@10" in table
    assert table.count("\n") == 4  # header, rule, two trials


def test_ray_tune_two_trials(tmp_path):
    pytest.importorskip("ray")
    import ray

    from recbole_llm.hyper import run_ray

    out = tmp_path / "ray.md"
    try:
        frame = run_ray("SASRec", "ml-100k", HYPER, num_samples=2, cpus_per_trial=1, report="epoch",
                        max_epochs=1, output_file=str(out), local_dir=str(tmp_path / "ray"),
                        config_dict=tiny_sasrec_config(tmp_path))
    finally:
        ray.shutdown()
    assert len(frame) == 2, frame
    assert "test_ndcg@10" in frame.columns, list(frame.columns)
    assert frame["test_ndcg@10"].notna().all()
    assert "learning_rate" in out.read_text()


def test_cli_two_process_gloo_ddp(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_llm.py"), "--model=SASRec", "--dataset=ml-100k",
         "--nproc=2", "--port=29517", "--epochs=1", "--hidden_size=16", "--inner_size=16", "--n_layers=1",
         "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=512", "--show_progress=False",
         f"--checkpoint_dir={tmp_path}/saved"],
        cwd=str(tmp_path), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test result" in proc.stdout + proc.stderr
    saved = os.listdir(tmp_path / "saved")
    assert len([f for f in saved if f.endswith(".pth")]) == 1, saved  # one file name agreed by both ranks
