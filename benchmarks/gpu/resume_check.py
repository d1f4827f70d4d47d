"""--resume=True on CUDA (device machine): the tiny aligned SeRALM run and the tiny Laser run of
tests/core/test_kill_resume.py with ``--use_gpu=True``, once uninterrupted and once killed mid-run then resumed.
Prints both test results; on CUDA they need not agree to the last digit (non-deterministic kernels)."""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.test_kill_resume import aligned_run, laser_run  # noqa: E402

CASES = (("SeRALM, alignment phase B", aligned_run, "align_step:6", "Resuming the interrupted alignment"),
         ("Laser, item refresh", laser_run, "item_refresh_batch:2", "Resuming the interrupted run"))

failed = False
for name, make, kill_at, expected in CASES:
    reference, _ = make(Path(tempfile.mkdtemp()))("--use_gpu=True")
    run = make(Path(tempfile.mkdtemp()))
    run("--use_gpu=True", kill_at=kill_at)
    result, output = run("--use_gpu=True", "--resume=True")
    resumed = expected in output
    on_cuda = any(line.strip().startswith("device = cuda") for line in output.splitlines())  # the config dump
    failed |= not (resumed and on_cuda)
    print(f"{name}: resumed={resumed} on_cuda={on_cuda}\n  uninterrupted {reference}\n  resumed       {result}")
sys.exit(1 if failed else 0)
