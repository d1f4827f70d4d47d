"""Checkpoints that load with ``torch.load(weights_only=True)``.

RecBole pickles its Config into every checkpoint and saves with ``pickle_protocol=4``; torch>=2.6 refuses
both by default. The plugin (a) allow-lists the few RecBole/numpy classes a checkpoint holds, and (b) saves
with torch's default protocol, atomically (temp file + rename) so a crash never leaves half a file.
Unpickling arbitrary code is available only through ``trust_pickled_code=True``.
"""

import os
import pickle

import numpy as np
import torch
from recbole.config import Config as RecBoleConfig
from recbole.utils.enum_type import EvaluatorType, FeatureSource, FeatureType, InputType, ModelType

try:
    from numpy.core.multiarray import scalar
except ImportError:  # numpy 2
    from numpy._core.multiarray import scalar

from recbole_llm.core.config import Config
from recbole_llm.core.errors import CorruptFileError, DataNotFoundError, UserInputError
from recbole_llm.core.faults import kill_point
from recbole_llm.core.fileio import atomic_path


def safe_globals():
    """Classes a plugin checkpoint may contain besides tensors and builtins."""
    dtype_classes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16,
                                                  np.int32, np.int64, np.uint8, np.bool_)]
    # checkpoints saved before the package's core/ folder name the Config by its old module
    return [Config, (Config, "recbole_llm.config.Config"), RecBoleConfig, ModelType, InputType, EvaluatorType,
            FeatureType, FeatureSource, np.dtype, scalar, *dtype_classes]


def register_safe_globals():
    torch.serialization.add_safe_globals(safe_globals())


def atomic_torch_save(obj, path):
    """``torch.save`` to a temp file in the same directory, then rename over ``path``."""
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(obj, tmp)
        kill_point("checkpoint_write")  # recovery tests: die with the temp file written, not yet renamed


class UnsafeCheckpointError(UserInputError, RuntimeError):
    """A checkpoint whose pickle holds objects outside the allow-list."""


def _first_line(err):
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def _is_damaged_archive(err):
    """A RuntimeError that says the file is not a readable torch zip archive (truncated, overwritten)."""
    text = str(err)
    return any(mark in text for mark in ("PytorchStreamReader", "zip archive", "central directory"))


def load_checkpoint(path, map_location=None, trust_pickled_code=False):
    """Load a checkpoint safely. ``trust_pickled_code=True`` runs whatever code the file's pickle holds:
    use it only for files you made yourself with an older RecBole.

    Without ``map_location`` on a machine without CUDA, tensors saved on a GPU are loaded onto the CPU."""
    if not os.path.isfile(path):
        raise DataNotFoundError(f"Checkpoint '{path}' does not exist.")
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickled_code)
    except pickle.UnpicklingError as err:  # weights_only refused a class (torch adds a long hint)
        if trust_pickled_code:
            raise
        raise UnsafeCheckpointError(
            f"Checkpoint '{path}' holds objects that cannot be loaded safely ({_first_line(err)}). "
            "If you made this file yourself (e.g. with plain RecBole), load it with "
            "trust_pickled_code=True (config key `trust_pickled_checkpoint: True`), which runs code from the file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated/overwritten: not a torch zip file
        if isinstance(err, (RuntimeError, PermissionError)) and not _is_damaged_archive(err):
            raise  # e.g. a device or permission problem: the file is fine, the error says what is wrong
        raise CorruptFileError(
            f"Checkpoint '{path}' cannot be read ({_first_line(err)}): it was damaged or replaced outside "
            "the package (its own writes are atomic). Delete it (a cache is rebuilt on the next run) or use "
            "another file.") from None
