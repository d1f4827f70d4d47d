"""SIGKILL in the middle of a run, then the same command again (with ``--resume=True``): the rerun continues
from the last finished unit of work, never reads a half-written file, and ends with exactly the test metrics
of an uninterrupted run (CPU, same seed). Kill points: recbole_llm/core/faults.py."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from recbole_llm.core.faults import ENV as KILL_ENV
from tests import helpers_laser, helpers_seralm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = ("import json, sys\n"
          "from recbole_llm.run.cli import main\n"
          "result = main(sys.argv[1:])\n"
          "print('RESULT ' + json.dumps({k: float(v) for k, v in result['test_result'].items()}))\n")


class Run:
    """One workspace (data, config, caches, checkpoints) in which the same command is run repeatedly."""

    def __init__(self, root, model, dataset, config):
        self.root, self.model, self.dataset = root, model, dataset
        self.config_file = root / "run.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.checkpoint_dir = config["checkpoint_dir"]
        (root / "cwd").mkdir(exist_ok=True)

    def __call__(self, *flags, kill_at=None):
        env = dict(os.environ, RECBOLE_LLM_CACHE=str(self.root / "cache"), OMP_NUM_THREADS="1")
        env.pop(KILL_ENV, None)
        if kill_at:
            env[KILL_ENV] = kill_at
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, f"--model={self.model}", f"--dataset={self.dataset}",
             f"--config_files={self.config_file}", "--state=INFO", *flags],
            cwd=self.root / "cwd", env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        if kill_at:
            assert proc.returncode == -signal.SIGKILL, f"expected to be killed at {kill_at}:\n{output[-3000:]}"
            return output
        assert proc.returncode == 0, output[-3000:]
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):]), output

    def resume_states(self):
        return glob.glob(os.path.join(self.checkpoint_dir, "*.resume.pth"))


def seralm_run(root):
    config = helpers_seralm.tiny_config_dict(root, epochs=3, stopping_step=10, train_batch_size=8,
                                             knowledge_batch_size=4)
    return Run(root, "SASRecSeRALM", helpers_seralm.DATASET, config)


def aligned_run(root):
    # 9 alignment steps over ~7 batches per pass: the resumed stretch crosses a pass of the train loader.
    # Resume states at steps 0, 3, 6; snapshots at 0, 2, 4, ...: step 3 resumes with the snapshot of step 2.
    # Dropout in LoRA and the recommender: a resume that lost the random state would train differently.
    config = helpers_seralm.tiny_config_dict(
        root, epochs=2, stopping_step=10, train_batch_size=8, knowledge_batch_size=4, alignment=True,
        generator_mode="sync", align_warmup_epochs=1, alignment_steps=9, refresh_every=2, align_resume_every=3,
        align_batch_size=4, align_max_new_tokens=4, align_generation_batch_size=8, frozen_base_epochs=1,
        lora_r=2, lora_alpha=4, lora_dropout=0.1, llm_learning_rate=1e-2)
    return Run(root, "SASRecSeRALM", helpers_seralm.DATASET, config)


def final_weights(run):
    """The best checkpoint's state_dict and its LoRA adapter, for an exact comparison of two runs."""
    from safetensors.torch import load_file

    from recbole_llm.core.checkpoint import load_checkpoint

    [checkpoint] = [p for p in glob.glob(os.path.join(run.checkpoint_dir, "*.pth"))]
    [adapter] = glob.glob(os.path.join(run.checkpoint_dir, "*-lora.safetensors"))
    return load_checkpoint(checkpoint, map_location="cpu")["state_dict"], load_file(adapter)


def assert_same_weights(a, b):
    for one, other in zip(a, b):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), key


def laser_run(root):
    helpers_laser.write_tiny_dataset(root)
    config = helpers_laser.tiny_config_dict(root, stage1_epochs=2, stage2_epochs=1, log_wandb=False)
    return Run(root, "Laser", "tiny-laser", config)


@pytest.fixture(scope="module")
def seralm_reference(tmp_path_factory):
    result, output = seralm_run(tmp_path_factory.mktemp("seralm_ref"))()
    assert "Generating knowledge for 12 items (0 cached)" in output
    return result


def test_killed_during_knowledge_generation_resumes_from_last_batch(tmp_path, seralm_reference):
    run = seralm_run(tmp_path)
    run(kill_at="knowledge_batch:2")  # 2 of 3 batches of 4 items written to the partial cache
    partial = glob.glob(str(tmp_path / "knowledge" / "*.partial.jsonl"))
    assert len(partial) == 1
    result, output = run("--resume=True")
    assert "Generating knowledge for 4 items (8 cached)" in output
    assert result == seralm_reference


def test_killed_during_an_epoch_resumes_that_epoch(tmp_path, seralm_reference):
    run = seralm_run(tmp_path)
    run(kill_at="train_batch:9")  # tiny data: 5 batches per epoch, so this is inside epoch 1
    assert len(run.resume_states()) == 1
    result, output = run("--resume=True")
    assert "Resuming the interrupted run from the start of epoch 1" in output
    assert result == seralm_reference
    assert run.resume_states() == []  # a finished run leaves no resume state


@pytest.mark.parametrize("write", [3, 4])
def test_killed_during_a_checkpoint_write_never_reads_the_partial_file(tmp_path, seralm_reference, write):
    # Writes in order: resume state (epoch 0), best checkpoint (epoch 0), resume state (epoch 1), ...
    run = seralm_run(tmp_path)
    run(kill_at=f"checkpoint_write:{write}")
    leftovers = [p for p in os.listdir(run.checkpoint_dir) if p.startswith(".")]
    assert leftovers, "the killed write should have left its temp file"
    result, output = run("--resume=True")
    assert "Resuming the interrupted run from the start of epoch" in output
    assert result == seralm_reference


def test_laser_killed_during_item_refresh_resumes(tmp_path_factory):
    reference, _ = laser_run(tmp_path_factory.mktemp("laser_ref"))()
    run = laser_run(tmp_path_factory.mktemp("laser_killed"))
    run(kill_at="item_refresh_batch:3")  # refreshes: epoch 0 start, epoch 0 validation, epoch 1 validation (killed)
    result, output = run("--resume=True")
    assert "Resuming the interrupted run from the start of epoch 1" in output
    assert result == reference


def test_without_resume_flag_a_rerun_starts_over_and_says_so(tmp_path):
    run = seralm_run(tmp_path)
    run(kill_at="train_batch:9")
    _, output = run()
    assert "pass --resume=True to continue that run" in output
    assert "Resuming" not in output


@pytest.fixture(scope="module")
def aligned_reference(tmp_path_factory):
    run = aligned_run(tmp_path_factory.mktemp("aligned_ref"))
    result, output = run()
    assert "alignment phase C" in output
    assert not glob.glob(os.path.join(run.checkpoint_dir, "*.align.pth"))  # a finished run leaves none
    return result, final_weights(run)


def test_alignment_killed_in_phase_b_resumes_from_its_last_saved_step(tmp_path, aligned_reference):
    run = aligned_run(tmp_path)
    run(kill_at="align_step:6")  # killed before step 5; the state of step 3 was saved (every 3 steps)
    assert len(glob.glob(os.path.join(run.checkpoint_dir, "*.align.pth"))) == 1
    result, output = run("--resume=True")
    assert "Resuming the interrupted alignment in phase B at step 3" in output
    assert "alignment phase A" not in output  # the warm-up is not redone
    assert result == aligned_reference[0]
    assert_same_weights(final_weights(run), aligned_reference[1])
    assert not glob.glob(os.path.join(run.checkpoint_dir, "*.align.pth"))


def test_alignment_killed_in_phase_c_resumes_the_regeneration(tmp_path, aligned_reference):
    run = aligned_run(tmp_path)
    run(kill_at="knowledge_batch:5")  # 3 batches of base knowledge, then after the 2nd of 3 batches of phase C
    result, output = run("--resume=True")
    assert "Resuming the interrupted alignment in phase C" in output
    assert "alignment step" not in output  # phase B is not redone
    assert "Generating knowledge for 4 items (8 cached)" in output
    assert result == aligned_reference[0]
    assert_same_weights(final_weights(run), aligned_reference[1])


def test_aligned_run_killed_after_alignment_resumes_its_epoch_and_cleans_up(tmp_path, aligned_reference):
    run = aligned_run(tmp_path)
    # train_batch hits: 7 warm-up batches, 7 of the frozen base's epoch, then 7 per epoch of the final training
    run(kill_at="train_batch:24")
    result, output = run("--resume=True")
    assert "Resuming the interrupted run from the start of epoch 1" in output
    assert "alignment step" not in output and "Resuming the interrupted alignment" not in output
    assert result == aligned_reference[0]
    assert_same_weights(final_weights(run), aligned_reference[1])
    assert not glob.glob(os.path.join(run.checkpoint_dir, "*.align.pth"))  # left by the alignment, removed at the end


# ---------------------------------------------------------------- which resume state matches (found by review)

def _ml100k_copy(tmp_path):
    """A private copy of ml-100k's .inter file as dataset 'mlcopy' (RecBole always reads 'ml-100k' from its
    own folder) and a tiny SASRec config on it."""
    import shutil

    from recbole_llm.core.config import Config
    from tests.helpers_foundation import tiny_sasrec_config

    src = Config("SASRec", "ml-100k", config_dict={"train_neg_sample_args": None}, cmd_args=[])["data_path"]
    folder = tmp_path / "data" / "mlcopy"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(src, "ml-100k.inter"), folder / "mlcopy.inter")
    cfg = tiny_sasrec_config(tmp_path, data_path=str(tmp_path / "data"))
    return folder / "mlcopy.inter", lambda **extra: Config("SASRec", "mlcopy", config_dict=dict(cfg, **extra),
                                                          cmd_args=[])


def test_resume_fingerprint_covers_the_data_files(tmp_path):
    from recbole_llm.core.resume import resume_state_path

    inter, make_config = _ml100k_copy(tmp_path)
    before = resume_state_path(make_config())
    lines = inter.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # same size, other content
    inter.write_text("\n".join(lines) + "\n")
    os.utime(inter, ns=(1, 1))  # another mtime even on a coarse clock
    assert resume_state_path(make_config()) != before


def test_resume_with_only_another_configs_state_warns_and_starts_over(tmp_path, caplog):
    import logging
    import types

    from recbole_llm.core.resume import resume_state_path
    from recbole_llm.core.safe_trainer import SafeCheckpointMixin

    _, make_config = _ml100k_copy(tmp_path)
    old = make_config(learning_rate=0.01)
    os.makedirs(old["checkpoint_dir"], exist_ok=True)
    other = resume_state_path(old)
    with open(other, "wb") as f:
        f.write(b"left by a killed run")
    config = make_config()
    trainer = types.SimpleNamespace(config=config, resume_state_file=resume_state_path(config),
                                    logger=logging.getLogger("resume-test"))
    with caplog.at_level(logging.INFO, logger="resume-test"):
        assert SafeCheckpointMixin.resume_interrupted_run(trainer) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and os.path.basename(other) in warnings[0].getMessage()
    assert "different config or different data" in warnings[0].getMessage()
