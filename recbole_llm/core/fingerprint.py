"""Identity of what a cache was made from: the package's version, and a dataset on disk (which atomic files a run
reads and a digest of their bytes).

Used by the caches of trained recommenders (a changed file retrains), the resume state (a resume never continues on
changed data) and checkpoints (``recommend`` refuses one whose data changed). A leaf module: it knows no model.
"""

import hashlib
import os

import recbole_llm


def package_version():
    """recbole_llm's version, part of every on-disk cache key: a new release may write a cache differently,
    so it never reads one written by another version (read at call time, so tests can patch it)."""
    return str(recbole_llm.__version__)


def data_files(config):
    """(suffix, path) of the dataset's atomic files that exist: .inter, .item, .user, and the pre-split
    ``<dataset>.<part>.inter`` files of ``benchmark_filename``."""
    folder, name = config["data_path"], config["dataset"]
    parts = config["benchmark_filename"] if "benchmark_filename" in config else None
    candidates = [(suffix, os.path.join(folder, f"{name}.{suffix}"))
                  for suffix in ["inter", "item", "user"] + [f"{part}.inter" for part in parts or []]]
    return [(suffix, path) for suffix, path in candidates if os.path.isfile(path)]


def data_digest(config):
    """sha256 (16 hex) of the dataset's atomic files (see ``data_files``)."""
    files = data_files(config)
    if not files:
        raise FileNotFoundError(f"no atomic files for dataset '{config['dataset']}' under data_path "
                                f"'{config['data_path']}'")
    digest = hashlib.sha256()
    for suffix, path in files:
        digest.update(suffix.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
