"""Issue 5: hyperopt and Ray Tune searches, and 2-process gloo DDP, each on a tiny SASRec."""

import os
import subprocess
import sys

import pytest

from recbole_llm.core.errors import ConfigError
from recbole_llm.run.hyper import read_hyper_file, run_hyperopt
from tests.helpers_foundation import tiny_sasrec_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

    from recbole_llm.run.hyper import run_ray

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


# ---------------------------------------------------------------- run_hyper.py flags and the summary (found by review)

def _fake_objective(config_dict, config_file_list, **kwargs):
    return {"model": "SASRec", "best_valid_score": 0.5, "valid_score_bigger": True,
            "best_valid_result": {"ndcg@10": 0.5}, "test_result": {"ndcg@10": 0.4}}


def test_hyperopt_summary_with_list_valued_choices(tmp_path, monkeypatch):
    # RecBole's params string of a list choice ("[64, 64]") holds ", ": re-parsing it crashed after all trials.
    import recbole_llm.run.quick_start as quick_start

    monkeypatch.setattr(quick_start, "objective_function", _fake_objective)
    params = tmp_path / "list.hyper"
    params.write_text("embedding_size choice [[64,64],[128]]\n")
    out = tmp_path / "out.md"
    run_hyperopt("SASRec", "ml-100k", str(params), algo="random", max_evals=3, output_file=str(out))
    table = out.read_text()
    assert table.count("\n") == 5  # header, rule, three trials
    assert "embedding_size" in table and ("64, 64" in table or "128" in table)


class _Calls:
    def __init__(self, monkeypatch):
        import run_hyper

        self.calls = []
        monkeypatch.setattr(run_hyper, "run_hyperopt", lambda *a, **k: self.calls.append(("hyperopt", a, k)))
        monkeypatch.setattr(run_hyper, "run_ray", lambda *a, **k: self.calls.append(("ray", a, k)))
        self.main = run_hyper.main


@pytest.mark.parametrize("tool, expected", [("Hyperopt", "hyperopt"), ("Ray", "ray"), ("RAY", "ray")])
def test_run_hyper_tool_is_case_insensitive(monkeypatch, tool, expected):
    calls = _Calls(monkeypatch)
    calls.main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={HYPER}", f"--tool={tool}",
                "--profile=none"])
    assert calls.calls[0][0] == expected


def test_run_hyper_display_file_goes_to_hyperopt_not_config(monkeypatch, capsys):
    calls = _Calls(monkeypatch)
    calls.main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={HYPER}", "--display_file=plot.html"])
    tool, args, kwargs = calls.calls[0]
    assert kwargs["display_file"] == "plot.html" and "display_file" not in args[-1]  # args[-1]: fixed keys
    calls.main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={HYPER}", "--display_file=plot.html",
                "--tool=ray", "--profile=none"])
    tool, args, kwargs = calls.calls[1]
    assert tool == "ray" and "display_file" not in args[-1] and "ignored" in capsys.readouterr().out


def test_run_hyper_reads_model_and_dataset_from_config_files(monkeypatch, tmp_path):
    calls = _Calls(monkeypatch)
    config = tmp_path / "a.yaml"
    config.write_text("model: SASRec\ndataset: ml-100k\nepochs: 3\n")
    calls.main([f"--params_file={HYPER}", f"--config_files={config}"])
    assert calls.calls[0][1][:2] == ("SASRec", "ml-100k")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no model and no dataset"):
        calls.main([f"--params_file={HYPER}", f"--config_files={empty}"])


@pytest.mark.parametrize("metric, bigger", [("NDCG@10", True), ("RMSE", False)])
def test_run_hyper_ray_follows_valid_metric_bigger(monkeypatch, metric, bigger):
    calls = _Calls(monkeypatch)
    calls.main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={HYPER}", "--tool=ray", "--profile=none",
                f"--valid_metric={metric}", "--epochs=2"])
    tool, args, kwargs = calls.calls[0]
    assert kwargs["valid_bigger"] is bigger and args[9] == 2  # max_epochs for ASHA
