"""The resume-state file of a run: everything needed to continue an interrupted training exactly.

RecBole saves a checkpoint only when validation improves and restores no random state, so a resumed run
repeats or skips work and draws different batches. Here the trainer writes, at the start of every epoch,
``<checkpoint_dir>/<model>-<dataset>-<fingerprint>.resume.pth`` (a digest of the config and of the data
files) holding the weights, optimizer, early-stopping state, the path of the best checkpoint so far, and the
random state (torch, numpy, python, and the train loader's shuffling generator). ``--resume=True`` continues
from it; on CPU the continued run then ends with the same metrics as an uninterrupted one. The file is
removed when training finishes.
"""

import glob
import hashlib
import os
import random
import re

import numpy as np
import torch

from recbole_llm.core.fingerprint import data_digest, data_files

# Keys that change how a run is executed or reported but not what it computes.
RUNTIME_KEYS = {
    "resume", "resume_checkpoint", "local_rank", "device", "gpu_id", "use_gpu", "show_progress", "state",
    "checkpoint_dir", "log_wandb", "wandb_project", "trust_pickled_checkpoint", "worker", "nproc", "ip", "port",
    "world_size", "offset", "single_spec", "config_files", "profile", "align_resume_every", "align_log_every",
    "llm_workers", "llm_worker_cpus", "llm_worker_gpus", "ray_address",
}


_DATA_DIGESTS = {}  # (files and their size/mtime) -> digest: hashing the data once per process, not per epoch


def data_files_digest(config):
    """``fingerprint.data_digest`` of the dataset's atomic files, so a resume never continues on changed data."""
    key = tuple((os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
                for path, st in ((path, os.stat(path)) for _, path in data_files(config)))
    if key not in _DATA_DIGESTS:
        # no atomic files (e.g. a dataset RecBole reads from elsewhere): nothing to digest
        _DATA_DIGESTS[key] = data_digest(config) if key else "no-files"
    return _DATA_DIGESTS[key]


def run_fingerprint(config):
    """Digest of every config value that affects the result and of the data files (the file name of the
    resume state)."""
    items = sorted((k, repr(v)) for k, v in config.final_config_dict.items() if k not in RUNTIME_KEYS)
    items.append(("<data files>", data_files_digest(config)))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:12]


def other_resume_states(config):
    """Resume states of the same model and dataset written for another config or other data."""
    prefix = f"{config['model']}-{config['dataset']}-"
    pattern = os.path.join(glob.escape(config["checkpoint_dir"]), glob.escape(prefix) + "*.resume.pth")
    own = os.path.abspath(resume_state_path(config))
    name = re.compile(re.escape(prefix) + r"[0-9a-f]{12}\.resume\.pth")  # not those of dataset '<dataset>-x'
    return sorted(p for p in glob.glob(pattern)
                  if os.path.abspath(p) != own and name.fullmatch(os.path.basename(p)))


def resume_state_path(config):
    name = f"{config['model']}-{config['dataset']}-{run_fingerprint(config)}.resume.pth"
    return os.path.join(config["checkpoint_dir"], name)


def capture_random_state(train_data=None):
    """Random state as tensors and plain values (loads with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": None,
    }
    generator = getattr(train_data, "generator", None)
    if isinstance(generator, torch.Generator):
        state["loader"] = generator.get_state()
    return state


def restore_random_state(state, train_data=None):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(train_data, "generator", None)
    if state.get("loader") is not None and isinstance(generator, torch.Generator):
        generator.set_state(state["loader"])
