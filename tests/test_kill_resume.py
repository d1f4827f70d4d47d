"""SIGKILL in the middle of a run, then the same command again (with ``--resume=True``): the rerun continues
from the last finished unit of work, never reads a half-written file, and ends with exactly the test metrics
of an uninterrupted run (CPU, same seed). Kill points: recbole_llm/faults.py."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from recbole_llm.faults import ENV as KILL_ENV
from tests import helpers_laser, helpers_seralm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = ("import json, sys\n"
          "from recbole_llm.quick_start import main\n"
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
    run(kill_at="item_refresh_batch:2")  # the refresh at the start of epoch 1
    result, output = run("--resume=True")
    assert "Resuming the interrupted run from the start of epoch 1" in output
    assert result == reference


def test_without_resume_flag_a_rerun_starts_over_and_says_so(tmp_path):
    run = seralm_run(tmp_path)
    run(kill_at="train_batch:9")
    _, output = run()
    assert "pass --resume=True to continue that run" in output
    assert "Resuming" not in output
