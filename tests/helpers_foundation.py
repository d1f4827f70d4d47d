"""Tiny SASRec settings on ml-100k (ships inside the recbole wheel) for fast end-to-end runs, and helpers for
the cache build-lock tests (a lock-holding subprocess; folder listings without the lock files)."""

TINY_SASREC = {
    "epochs": 1,
    "train_batch_size": 512,
    "eval_batch_size": 4096,
    "hidden_size": 16,
    "inner_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_neg_sample_args": None,
    "show_progress": False,
    "state": "WARNING",
    "seed": 2020,
    "reproducibility": True,
}


def tiny_sasrec_config(tmp_path, **overrides):
    cfg = dict(TINY_SASREC, checkpoint_dir=str(tmp_path / "saved"), log_wandb=False)
    cfg.update(overrides)
    return cfg


# A second process that takes recbole_llm.core.fileio.build_lock(argv[1]), says "locked", and 1 s later runs the
# code in argv[2] (with argv[3:] as ``args``) before it lets go: a stand-in for another run building the cache.
_LOCK_HOLDER = ("import sys, time\n"
                "from recbole_llm.core.fileio import build_lock\n"
                "args = sys.argv[3:]\n"
                "with build_lock(sys.argv[1], 'a test job'):\n"
                "    print('locked', flush=True)\n"
                "    time.sleep(1.0)\n"
                "    exec(sys.argv[2])\n")


def start_lock_holder(path, then_code="", *args):
    """Start the lock-holding process and return it once it holds the lock on ``path``."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(path), then_code, *map(str, args)],
                              stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().strip()
    assert line == "locked", f"the lock holder did not start: {line!r}"
    return holder


def listdir_without_locks(folder):
    """os.listdir(folder) less the hidden ``.<name>.lock`` files that build_lock leaves beside a built cache."""
    import os

    return [name for name in os.listdir(folder) if not (name.startswith(".") and name.endswith(".lock"))]
