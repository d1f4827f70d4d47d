"""Benchmarks: the quick quality run produces its table through the real code path (one tiny model), resumes
without rerunning, and the aggregation/claims/plot logic is right on hand-made records."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, quality, speed
from recbole_llm.core.faults import ENV as KILL_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SASREC = ["hidden_size=16", "inner_size=16", "n_layers=1", "n_heads=1", "MAX_ITEM_LIST_LENGTH=10"]
CPU_ENV = dict.fromkeys(("cpu", "cores", "usable_cores", "memory_gib", "os", "python", "torch", "recbole",
                         "transformers", "peft", "recbole_llm", "git_commit"), "x") | {"gpu": "none"}


def _run_quality(tmp_path, *settings, kill_at=None):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality.py"), "--quick", "--models", "SASRec",
           "--set", *TINY_SASREC, *settings, "--results-dir", str(tmp_path / "results"),
           "--work-dir", str(tmp_path / "work"), "--no-plot", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


def test_quick_quality_writes_table_and_resumes(tmp_path):
    # The first attempt's child is killed in its 2nd epoch (~96 batches per epoch); the rerun retries it, and
    # the retry continues from the run's resume state instead of starting over.
    killed = _run_quality(tmp_path, "epochs=2", kill_at="train_batch:120")
    [record] = common.read_jsonl(str(tmp_path / "results" / "quality-quick.jsonl"))
    assert record["status"] == "failed" and record["returncode"] == -9, killed.stdout + killed.stderr

    first = _run_quality(tmp_path, "epochs=2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 already finished, 1 to run" in first.stdout
    table = (tmp_path / "results" / "quality-quick.md").read_text()
    header = "| model | Recall@10 | NDCG@10 | MRR@10 | seeds | time/run (s) | peak RSS (MiB) |"
    assert header in table
    assert "## ml-100k" in table and "- machine:" in table and "- versions:" in table and "- command:" in table
    row = next(line for line in table.splitlines() if line.startswith("| SASRec |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    recall, ndcg, mrr = (float(c) for c in cells[1:4])
    assert 0 < ndcg <= recall <= 1 and 0 < mrr <= 1
    assert cells[4:6] == ["1*", "-"]  # a resumed run is marked and left out of the time/run mean
    records = common.read_jsonl(str(tmp_path / "results" / "quality-quick.jsonl"))
    assert [r["status"] for r in records] == ["failed", "ok"] and records[1]["overrides"]["hidden_size"] == 16
    assert records[1]["resumed"] is True and "Resuming the interrupted run from the start of epoch 1" in \
        open(records[1]["log"]).read()
    assert abs(records[1]["test"]["ndcg@10"] - ndcg) < 1e-4 and records[1]["peak_rss_mib"] > 50
    assert records[1]["torch_threads"] == 1  # --threads 1 reached the child and is recorded

    second = _run_quality(tmp_path, "epochs=2")  # everything is finished: nothing runs again, the table is rebuilt
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 already finished, 0 to run" in second.stdout
    assert len(common.read_jsonl(str(tmp_path / "results" / "quality-quick.jsonl"))) == 2


def _record(dataset, variant, seed, ndcg, status="ok"):
    v = {x.id: x for x in quality.variants("cpu")}[variant]
    return {"run_id": f"{dataset}|{variant}|seed={seed}", "status": status, "label": v.label, "log": "x.log",
            "seed": seed,
            "test": {"recall@10": ndcg * 2, "ndcg@10": ndcg, "mrr@10": ndcg / 2}, "wall_s": 10.0,
            "peak_rss_mib": 100.0, "returncode": 1, "error": "Traceback\nValueError: boom"}


def _runs(dataset, variant_ids, seeds):
    by_id = {v.id: v for v in quality.variants("cpu")}
    return [{"run_id": f"{dataset}|{vid}|seed={s}", "dataset": dataset, "variant": by_id[vid], "seed": s}
            for s in seeds for vid in variant_ids]


def test_aggregate_claims_and_render():
    runs = _runs("ml-100k", ["SASRec", "SASRecSeRALM-NA", "Laser"], [1, 2])
    records = [_record("ml-100k", "SASRec", 1, 0.050), _record("ml-100k", "SASRec", 2, 0.052),
               _record("ml-100k", "SASRecSeRALM-NA", 1, 0.040), _record("ml-100k", "SASRecSeRALM-NA", 2, 0.044),
               _record("ml-100k", "Laser", 1, 0.0, status="failed"), _record("ml-100k", "Laser", 1, 0.060),
               _record("other", "SASRec", 1, 0.9)]  # not planned: ignored
    table = quality.aggregate(records, runs)
    rows = table["ml-100k"]
    assert [len(rows[v]["ok"]) for v in ("SASRec", "SASRecSeRALM-NA", "Laser")] == [2, 2, 1]
    assert rows["Laser"]["pending"] == 1 and rows["Laser"]["failed"] == []  # the retry replaced the failure
    lines = quality.claims(table)
    seralm = next(line for line in lines if "SASRecSeRALM" in line)
    assert "**does not hold**" in seralm and "0.0420 vs 0.0510" in seralm and "larger than the seed spread" in seralm
    assert "seeds 1, 2" not in seralm and "only" not in seralm  # both rows have the same seeds

    # A row with fewer seeds is compared on the seeds both have, not with the base's mean over all of them:
    # 0.0505 is below SASRec's mean (0.0510) but above SASRec's seed 1 (0.0500).
    runs_aligned = runs + _runs("ml-100k", ["SASRecSeRALM-aligned"], [1, 2])
    partial = quality.claims(quality.aggregate(records + [_record("ml-100k", "SASRecSeRALM-aligned", 1, 0.0505)],
                                               runs_aligned))
    aligned = next(line for line in partial if "aligned" in line)
    assert "**holds**" in aligned and "0.0505 vs 0.0500" in aligned and "on seed 1 only (both rows have it)" in aligned
    laser = next(line for line in lines if "Laser beats" in line)
    assert "**holds**" in laser and "beats 2/2" in laser
    env = CPU_ENV
    text = quality.render(table, "cpu", env, "python benchmarks/quality.py", "t0", "t1", [[1, 1, 1], [2, 2, 2]], [])
    assert "| SASRec | 0.1020 ± 0.0028 | 0.0510 ± 0.0014 | 0.0255 ± 0.0007 | 2 | 10 | 100 |" in text
    assert "| Laser | 0.1200 | 0.0600 | 0.0300 | 1 (1 not run) |" in text
    assert "`metric_decimal_place`" in text  # the table says how much of a value is RecBole's rounding

    records[1] = dict(records[1], resumed=True, wall_s=3.0)  # continued a killed attempt: its time is partial
    text = quality.render(quality.aggregate(records, runs), "cpu", env, "cmd", "t0", "t1", [None, None], [])
    assert "| SASRec | 0.1020 ± 0.0028 | 0.0510 ± 0.0014 | 0.0255 ± 0.0007 | 2* | 10 | 100 |" in text
    assert "CUDA peak" not in text and "guide across rows" in text
    records[0] = dict(records[0], cuda_peak_mib=2048.0)  # a --gpu run: its CUDA peak gets a column
    text = quality.render(quality.aggregate(records, runs), "gpu", env, "cmd", "t0", "t1", [None, None], [])
    assert "| CUDA peak (MiB) |" in text and "| 2* | 10 | 100 | 2048 |" in text


def test_failed_runs_are_listed_and_plot_is_written(tmp_path):
    runs = _runs("ml-100k", ["SASRec", "PAUP"], [1])
    table = quality.aggregate([_record("ml-100k", "SASRec", 1, 0.05), _record("ml-100k", "PAUP", 1, 0, "failed")],
                              runs)
    text = quality.render(table, "quick", CPU_ENV, "cmd", "t0", "t1", [None, None], [])
    assert "## Failed runs" in text and "ValueError: boom" in text and "| PAUP | - | - | - | 0 (1 failed) |" in text
    pytest.importorskip("matplotlib")
    path = quality.plot(table, str(tmp_path / "q.png"))
    assert path and os.path.getsize(path) > 1000


def test_variants_and_selection():
    cpu = {v.id: v for v in quality.variants("cpu")}
    # every mode runs the YAML defaults (with its profile); each ablation and control changes one switch
    for mode in ("cpu", "gpu"):
        rows = {v.id: v for v in quality.variants(mode)}
        assert rows["Laser"].overrides == {} and rows["Laser-no_mformer"].overrides == {"use_mformer": False}
        assert rows["Laser-untrained"].overrides == {"epochs": 0}
        assert rows["Laser-no_moe"].overrides == {"use_moe": False}
        assert rows["Laser-centred"].overrides == {"score_centering": "item_mean"} and rows["Laser-centred"].family == "control"
    assert cpu["Laser-long"].profile == "cpu-long" and cpu["Laser-long"].overrides == {}
    assert cpu["Laser-long-lr5"].profile == "cpu-long" and cpu["Laser-long-lr5"].overrides == {"learning_rate": 1e-5}
    assert "Laser-long" not in {v.id for v in quality.variants("gpu")}
    for base in quality.SERALM_BASES:
        assert cpu[f"{base}SeRALM-NA"].overrides["alignment"] is False
        assert cpu[f"{base}SeRALM-aligned"].overrides["alignment"] is True
        assert cpu[f"{base}SeRALM-NA"].base == base
        # a SeRALM variant and its base train with the same schedule
        same = {k: cpu[base].overrides[k] for k in quality.CPU_TRAIN}
        assert {k: cpu[f"{base}SeRALM-NA"].overrides[k] for k in quality.CPU_TRAIN} == same
    assert {v.id for v in quality.select(quality.variants("cpu"), ["Laser"])} == {
        "Laser", "Laser-untrained", "Laser-no_mformer", "Laser-no_prefix", "Laser-no_stage1", "Laser-no_moe", "Laser-long"}
    assert [v.id for v in quality.select(quality.variants("cpu"), None, ["Laser"])] == ["Laser"]
    with pytest.raises(SystemExit, match="unknown --variants"):
        quality.select(quality.variants("cpu"), None, ["SASRecSeRALM"])
    with pytest.raises(SystemExit, match="unknown --models"):
        quality.select(quality.variants("cpu"), ["NoSuchModel"])
    assert speed.model_overrides("PAUPSeRALM", "quick")["knowledge_source"] == "item_text"


def test_jsonl_skips_truncated_line_and_mean_std(tmp_path):
    path = str(tmp_path / "r.jsonl")
    common.append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b"')  # killed mid-write
    assert common.read_jsonl(path) == [{"a": 1}]
    assert common.mean_std([1.0]) == (1.0, None)
    mean, std = common.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(std - 1.0) < 1e-12
    assert common.parse_overrides(["a=1", "b=True", "c=~", "d=[1, 2]"]) == {"a": 1, "b": True, "c": None, "d": [1, 2]}


def test_speed_render_and_jobs(tmp_path):
    summary = {"min_s": 1.0, "median_s": 2.0, "runs": 3}
    common_fields = {"status": "ok", "peak_rss_mib": 500.0, "cuda_peak_mib": None, "loadavg_end": [1.5, 1, 1]}
    results = {
        "refresh": dict(common_fields, items=100, batches=2, batch_size=64, mean_T=50.0, max_T=60, llm_layers=2,
                        refresh=summary, backbone={"min_s": 0.5, "median_s": 1.0, "runs": 3},
                        refresh_items_per_s=50.0, backbone_items_per_s=100.0, ratio=0.5),
        "generation": dict(common_fields, items=8, batch_size=8, batches=1, max_new_tokens=16, new_tokens=100,
                           mean_prompt_tokens=40.0, llm_layers=30, example="A microscope.", pipeline=summary,
                           plain=summary, pipeline_items_per_s=4.0, plain_items_per_s=4.0, ratio=1.0),
        "workers": dict(common_fields, items=32, batch_size=8, max_new_tokens=16, threads=2, worker_threads=1,
                        one=summary, two={"min_s": 0.5, "median_s": 1.0, "runs": 3}, one_items_per_s=16.0,
                        two_items_per_s=32.0, ratio=2.0, same_texts=True, llm_layers=None),
        "train:SASRec": dict(common_fields, model="SASRec", batch_size=1024, steps=3, samples_per_s=900.0,
                             samples_per_s_with_loading=850.0, median_step_s=1.1, trainable_params=1234),
        "eval:SASRecSeRALM": dict(common_fields, model="SASRecSeRALM", base="SASRec", seralm=summary,
                                  base_time={"min_s": 1.0, "median_s": 1.6, "runs": 3}, ratio=1.25),
        "eval:PAUPSeRALM": {"status": "failed", "returncode": 1, "error": "Traceback\nRuntimeError: x", "log": "l"},
    }
    text = speed.render(results, "cpu", CPU_ENV, "cmd", "t0", "t1", [None, None], "amazon-scientific")
    assert "| 100 | 2 x 64 | 50 / 60 | 2 | 50.0 (100.0) | 100.0 (200.0) | 0.50 | 500 | 1.5 |" in text
    assert "| 8 | 1 x 8 | 40 | 16 / 100 | 30 | 4.00 (8.00) | 4.00 (8.00) | 1.00 | 500 | 1.5 |" in text
    assert "| 32 | 8 | 16 | 2 / 1 | 16.00 (32.00) | 32.00 (64.00) | 2.00 | yes | 500 | 1.5 |" in text
    assert "| SASRec | 1024 | 3 | 900.0 | 850.0 | 1.100 | 1,234 | 500 | 1.5 |" in text
    assert "| SASRecSeRALM | SASRec | 2.00 (1.00) | 1.60 (1.00) | 1.25x | - | - | 500 | 1.5 |" in text  # older record
    assert "eval:PAUPSeRALM: exit 1: `RuntimeError: x`" in text
    args, mode = speed.parse_args(["--quick", "--work-dir", str(tmp_path)])
    names = [name for name, _ in speed.jobs(args, mode)]
    assert names == ["refresh", "generation", "workers", "train:SASRec", "train:PAUP", "train:SASRecSeRALM", "train:Laser",
                     "eval:CaserSeRALM", "eval:SASRecSeRALM", "eval:PAUPSeRALM", "eval:LightSANsSeRALM"]
    spec = dict(speed.jobs(args, mode))["eval:PAUPSeRALM"]
    assert spec["configs"]["PAUPSeRALM"]["knowledge_source"] == "item_text"
    assert {k: spec["configs"]["PAUP"][k] for k in quality.QUICK_TRAIN} == quality.QUICK_TRAIN


def test_speed_writes_the_table_after_each_job(tmp_path, monkeypatch):
    """A kill from outside (a device's time limit) must not lose the jobs that already finished."""
    row = {"model": "SASRec", "batch_size": 8, "steps": 2, "samples_per_s": 123.0, "median_step_s": 0.1,
           "trainable_params": 10, "cuda_peak_mib": None}
    md_path = tmp_path / "res" / "speed-quick.md"
    seen = []

    def fake_jobs(args, mode):
        for name in ("train:SASRec", "train:Caser"):
            yield name, {"work_dir": str(tmp_path / "work")}

    def fake_run_child(argv, log_path, env=None, timeout=None):
        spec = json.loads(open(argv[-1]).read())
        if not seen:  # first job finishes
            common.write_json(spec["result_path"], row)
        else:  # the second job: the first one's row is already on disk
            seen.append(md_path.read_text())
            raise KeyboardInterrupt  # what a kill of the parent looks like from here
        seen.append(None)
        return 0, 1.0, 100.0

    monkeypatch.setattr(speed, "jobs", fake_jobs)
    monkeypatch.setattr(common, "run_child", fake_run_child)
    with pytest.raises(KeyboardInterrupt):
        speed.main(["--quick", "--results-dir", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work")])
    text = seen[-1]
    assert "| SASRec | 8 | 2 | 123.0 |" in text and "Partial: 1 of the planned jobs" in text


def test_speed_sections_measure_tiny_models(tmp_path):
    """The measuring code itself, on the tiny Laser and SASRec: the replay sees the refresh's batches, steps and
    ceilings pair up, ratios are finite and positive."""
    from tests.helpers_laser import tiny_config_dict, write_tiny_dataset

    write_tiny_dataset(tmp_path)
    config_dict = dict(tiny_config_dict(tmp_path), log_wandb=False)
    refresh = speed.section_refresh({"dataset": "tiny-laser", "config_dict": config_dict, "profile": "none",
                                     "repeats": 2})
    assert refresh["batches"] >= 1 and refresh["items"] > 0 and len(refresh["pair_ratios"]) == 2
    assert refresh["refresh"]["runs"] == refresh["backbone"]["runs"] == 2 and 0 < refresh["ratio"] < 100
    train = speed.section_train({"model": "Laser", "dataset": "tiny-laser", "config_dict": config_dict,
                                 "profile": "none", "train_batches": 2})
    assert train["steps"] == 2 and 0 < train["samples_per_s_with_loading"] <= train["samples_per_s"]


def test_speed_eval_times_and_measures_each_model_on_its_own(tmp_path):
    """SeRALM vs its base on the tiny data: both timed, and each one's memory is its own, not the child's peak."""
    from tests.helpers_seralm import DATASET, tiny_config_dict

    config_dict = dict(tiny_config_dict(tmp_path), knowledge_source="item_text")
    result = speed.section_eval({"model": "SASRecSeRALM", "base": "SASRec", "dataset": DATASET, "profile": "none",
                                 "repeats": 2, "configs": {"SASRecSeRALM": config_dict, "SASRec": config_dict}})
    assert result["seralm"]["runs"] == result["base_time"]["runs"] == 2 and result["ratio"] > 0
    seralm, base = result["seralm_memory"], result["base_memory"]
    # SeRALM's weights hold the knowledge vectors (a buffer) and their projection beside what SASRec has
    assert seralm["weights_mib"] > base["weights_mib"] > 0
    assert seralm["eval_added_cuda_mib"] is None  # a CPU run
    env = CPU_ENV
    text = speed.render({"eval:SASRecSeRALM": dict(result, status="ok", peak_rss_mib=700.0, loadavg_end=None)},
                        "cpu", env, "cmd", "t0", "t1", [None, None], DATASET)
    assert f"| {seralm['weights_mib']:.1f} | {base['weights_mib']:.1f} | 700 |" in text
    cuda = dict(result, seralm_memory=dict(seralm, eval_added_cuda_mib=120.4))
    text = speed.render({"eval:SASRecSeRALM": dict(cuda, status="ok", peak_rss_mib=700.0, loadavg_end=None)},
                        "gpu", env, "cmd", "t0", "t1", [None, None], DATASET)
    assert f"| {seralm['weights_mib']:.1f} + 120 |" in text


def test_a_run_recorded_under_another_profile_yaml_is_not_finished(tmp_path, monkeypatch):
    """A run recorded under one CPU profile is not taken as done after the profile's YAML changed (the working
    directory's properties/ wins the search, so a copy there stands in for an edit); its id, which the report
    matches, stays the same."""
    args, _ = quality.parse_args(["--variants", "Laser", "--datasets", "amazon-scientific", "--seeds", "1"])
    (before,) = quality.plan(args, "cpu")
    done = {quality.done_key(before["run_id"], before["config_files"])}
    assert "Laser-cpu.yaml" in before["config_files"] and quality.is_finished(before, done)
    monkeypatch.chdir(tmp_path)
    os.makedirs("properties/model")
    with open(os.path.join(REPO, "properties", "model", "Laser-cpu.yaml")) as f:
        text = f.read()
    with open("properties/model/Laser-cpu.yaml", "w") as f:
        f.write(text + "\n# a comment changes no setting\n")
    (commented,) = quality.plan(args, "cpu")
    assert quality.is_finished(commented, done)
    with open("properties/model/Laser-cpu.yaml", "w") as f:
        f.write(text + "\nstage1_epochs: 1\n")
    (after,) = quality.plan(args, "cpu")
    assert after["run_id"] == before["run_id"] and not quality.is_finished(after, done)
    legacy = {quality.done_key(before["run_id"], None)}  # a record from before runs recorded their YAMLs
    assert not quality.is_finished(before, legacy)
