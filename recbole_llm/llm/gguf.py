"""GGUF files as HF checkpoints: a GGUF file is dequantised by transformers (about 20 s for SmolLM2), so the first load
converts it once to a safetensors directory under ``cache_dir()/converted`` and later loads read that (< 1 s). The
copy is keyed by the file's bytes and the versions that made it."""

import hashlib
import json
import logging
import os

import torch

from recbole_llm.core import fingerprint
from recbole_llm.core.fileio import atomic_dir, atomic_write_text, build_lock
from recbole_llm.llm.bundled import cache_dir

logger = logging.getLogger(__name__)


def _sha256_prefix(path, n=16):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:n]


def _gguf_digest(gguf_path):
    """sha256[:16] of the GGUF file, remembered in cache_dir()/converted/digests.json per (path, inode, size,
    mtime, ctime) so that a cached load does not re-read ~100 MB (several seconds on a busy CPU). ctime is
    there because any write, copy-over or utime() moves it, while mtime can be set back by tools."""
    stat = os.stat(gguf_path)
    key = f"{os.path.realpath(gguf_path)}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    index_path = os.path.join(cache_dir(), "converted", "digests.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict) or not isinstance(index.get(key), str):
        index = index if isinstance(index, dict) else {}
        index[key] = _sha256_prefix(gguf_path)
        atomic_write_text(index_path, json.dumps(index, indent=1))
    return index[key]


def converted_gguf_dir(gguf_path):
    """Where the safetensors copy of ``gguf_path`` lives: cache_dir()/converted/<name>-<key>, the key digesting
    the GGUF's bytes (sha256), this package's version and transformers' (which does the dequantising)."""
    import transformers  # heavy: ~1 s to import, paid only when a model is used

    name = os.path.splitext(os.path.basename(gguf_path))[0]
    versions = f"recbole_llm={fingerprint.package_version()}|transformers={transformers.__version__}"
    inputs = f"{_gguf_digest(gguf_path)}|{versions}"
    return os.path.join(cache_dir(), "converted", f"{name}-{hashlib.sha256(inputs.encode()).hexdigest()[:16]}")


def convert_gguf(gguf_path):
    """Dequantise a GGUF file once into a safetensors HF directory (atomic); returns that directory."""
    target = converted_gguf_dir(gguf_path)
    if not os.path.isfile(os.path.join(target, "config.json")):
        with build_lock(target, f"converting {gguf_path}"):
            if not os.path.isfile(os.path.join(target, "config.json")):  # another process may have converted it
                _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path, target):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers, ~1 s to import

    folder, name = os.path.split(os.path.abspath(gguf_path))
    logger.info(f"Converting {gguf_path} to safetensors in {target} (once; later loads are fast)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as err:
        raise ValueError(f"Could not read {gguf_path!r} as a GGUF decoder LLM: {err}") from err
    # The dequantised weights are plain tensors; without this, save_pretrained would record GGUF quantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    # A copy that another process finished meanwhile (a platform without file locks) is kept: it is as good as ours.
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
