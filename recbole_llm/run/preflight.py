"""Checks of a run's inputs before anything is written (log file, caches, checkpoints).

A user's mistake found after the log file was opened, or after minutes of knowledge generation, costs time
and leaves files behind; these checks read only headers and small config files. Each raises a
``UserInputError`` that names the file or key, what is wrong and what was expected.

What a model loads besides the atomic files comes from its ``run_inputs(config)`` classmethod (a subset of
``{"item_text", "llm", "encoder", "ray"}``); RecBole's own models load none of them.
"""

import csv
import os
import socket

from recbole_llm.core.config import config_get
from recbole_llm.core.errors import ConfigError, DataNotFoundError, UserInputError
from recbole_llm.llm import bundled, loader
from recbole_llm.llm.item_text import pick_title_field

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")
ROWS_CHECKED = 1000  # rows read per file for the column-count and number checks (the rest: RecBole's reader)


class DataFileError(UserInputError, ValueError):
    """An atomic file exists but cannot be read as one."""


def check_run_inputs(config):
    """Every check that applies to ``config``'s model; raises on the first problem."""
    needs = run_inputs(config)
    if config["benchmark_filename"] or os.path.isfile(_atomic_path(config, "inter")):
        headers = check_atomic_files(config, need_item_file="item_text" in needs)
        if "item_text" in needs:
            check_title_field(config, headers.get("item"))
    # else: a dataset RecBole downloads itself (check_dataset_available refused any other missing one)
    if "llm" in needs:
        check_llm_path(config_get(config, "llm_path"))
    if "encoder" in needs:
        check_encoder_path(config_get(config, "encoder_path"), config_get(config, "knowledge_text_dim"))
    if "ray" in needs:
        check_ray_address(config_get(config, "ray_address"))


def run_inputs(config):
    model_class = getattr(config, "model_class", None)
    declare = getattr(model_class, "run_inputs", None)
    return set(declare(config)) if declare else set()


# ---------------------------------------------------------------------------------------- atomic files
def _atomic_path(config, suffix):
    return os.path.join(config["data_path"], f"{config['dataset']}.{suffix}")


def read_header(path, separator):
    """``{field: type}`` of an atomic file's header; raises DataFileError naming the bad column."""
    if os.path.getsize(path) == 0:
        raise DataFileError(f"Atomic file '{path}' is empty; expected a header line of `name:type` columns "
                            f"(types {', '.join(FEATURE_TYPES)}) and one row per line.")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    fields = {}
    for column in header.split(separator):
        name, colon, kind = column.rpartition(":")
        if not colon or not name:
            raise DataFileError(f"Atomic file '{path}': header column {column!r} has no type; expected `name:type` "
                                f"with type one of {', '.join(FEATURE_TYPES)}, columns separated by {separator!r}.")
        if kind not in FEATURE_TYPES:
            raise DataFileError(f"Atomic file '{path}': header column {column!r} has type {kind!r}; expected one "
                                f"of {', '.join(FEATURE_TYPES)}.")
        fields[name] = kind
    return fields


def _check_rows(path, fields, separator):
    """The first rows: the header's column count, numbers in float columns, at least one row. Read with
    csv's default quoting, as RecBole's pandas reader does (a quoted value may hold separators or newlines)."""
    kinds = list(fields.values())
    names = list(fields)
    rows = 0
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long item descriptions
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=separator)
        next(reader, None)
        for values in reader:
            if not values or values == [""]:
                continue
            rows += 1
            if len(values) != len(kinds):
                raise DataFileError(f"Atomic file '{path}' line {reader.line_num} has {len(values)} columns; the "
                                    f"header has {len(kinds)} ({', '.join(names)}), separated by {separator!r}.")
            for name, kind, value in zip(names, kinds, values):
                if kind == "float" and value.strip():
                    try:
                        float(value)
                    except ValueError:
                        raise DataFileError(f"Atomic file '{path}' line {reader.line_num}: {name}:float is "
                                            f"{value!r}, not a number.") from None
            if rows >= ROWS_CHECKED:
                break
    if rows == 0:
        raise DataFileError(f"Atomic file '{path}' has a header but no rows.")


def check_atomic_files(config, need_item_file=False):
    """Headers and first rows of the dataset's interaction file(s) (required), .item and .user files;
    returns ``{suffix: fields}`` (``inter`` for the first interaction file)."""
    separator = config["field_separator"] or "\t"
    parts = config["benchmark_filename"]
    inter_suffixes = [f"{part}.inter" for part in parts] if parts else ["inter"]
    headers = {}
    for suffix in inter_suffixes + ["item", "user"]:
        path = _atomic_path(config, suffix)
        if not os.path.isfile(path):
            if suffix.endswith("inter") or (suffix == "item" and need_item_file):
                raise DataNotFoundError(f"Atomic file '{path}' does not exist; model {config['model']} needs it "
                                        f"(data_path={config['data_path']!r}).")
            continue
        fields = read_header(path, separator)
        _check_rows(path, fields, separator)
        if suffix.endswith("inter"):
            for key in ("USER_ID_FIELD", "ITEM_ID_FIELD"):
                if config[key] and config[key] not in fields:
                    raise DataFileError(f"Atomic file '{path}' has no {key} column {config[key]!r}; its columns "
                                        f"are {list(fields)}. Rename the column or set {key}.")
            headers.setdefault("inter", fields)
        else:
            headers[suffix] = fields
    return headers


def check_title_field(config, item_fields):
    """Text-based models need a title-like field in the .item file (and in load_col when it lists fields)."""
    present = list(item_fields or {})
    load_col = (config["load_col"] or {}).get("item")
    if isinstance(load_col, (list, tuple)):
        present = [f for f in present if f in load_col]
    title, expected = pick_title_field(present, config_get(config, "item_text_fields"))
    if title:
        return title
    raise DataFileError(
        f"Model {config['model']} builds item text, but '{_atomic_path(config, 'item')}' has no title-like field "
        f"(looked for {expected}; fields loaded: {present or 'none'}). Add a title column or set item_text_fields "
        "with the title field first.")


# ------------------------------------------------------------------------------------- model files
def check_llm_path(path):
    """None (the bundled SmolLM2), a .gguf file, or a decoder-LLM directory."""
    if path is None:
        bundled.bundled_llm_gguf()  # raises with the pip command when the package is missing
        return
    path = _existing(path, "llm_path", "a local HF decoder-LLM directory or a .gguf file")
    expected = "a decoder-only causal LM directory (config.json with a *ForCausalLM architecture) or a .gguf file"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if not path.lower().endswith(".gguf") or magic != b"GGUF":
            raise ConfigError(f"llm_path {path!r} is a file but not a GGUF model (no GGUF header); expected {expected}.")
        return
    try:
        config = loader._load_config(path, "LLM", expected)
    except ValueError as err:
        raise ConfigError(f"llm_path: {err}") from None
    if not loader._is_decoder_llm(config):
        raise ConfigError(f"llm_path {path!r} holds a {config.model_type!r} model "
                          f"(architectures={getattr(config, 'architectures', None)}); expected {expected}.")


def check_encoder_path(path, expected_dim=None):
    """None (the bundled MiniLM) or an encoder directory whose width matches ``knowledge_text_dim`` if set."""
    path = bundled.bundled_encoder_dir() if path is None else _existing(path, "encoder_path",
                                                                      "a local HF text-encoder directory")
    expected = "a local HF text-encoder directory (e.g. BERT/MiniLM: config.json + weights + tokenizer)"
    try:
        config = loader._load_config(path, "Encoder", expected)
    except ValueError as err:
        raise ConfigError(f"encoder_path: {err}") from None
    if loader.is_generative(config):
        raise ConfigError(f"encoder_path {path!r} holds a {config.model_type!r} generative model; expected {expected}.")
    width = getattr(config, "hidden_size", None)
    if expected_dim and width and int(expected_dim) != int(width):
        raise ConfigError(f"encoder_path {path!r} outputs {width}-d vectors but knowledge_text_dim={expected_dim} "
                          "(the width the checkpoint or config was made with); use the encoder that width came "
                          "from, or unset knowledge_text_dim.")


def _existing(path, key, expected):
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise DataNotFoundError(f"{key} {path!r} does not exist; expected {expected}.")
    return path


# ---------------------------------------------------------------------------------------------- Ray
def check_ray_address(address, timeout=3.0):
    """A ``host:port`` (or ``ray://host:port``) Ray address must accept a TCP connection."""
    if not address or address in ("auto", "local"):
        return
    host_port = str(address).split("://", 1)[-1]
    host, colon, port = host_port.rpartition(":")
    if not colon or not port.isdigit():
        raise ConfigError(f"ray_address {address!r} is not understood; expected 'host:port', 'ray://host:port' "
                          "or ~ for a local Ray.")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"ray_address {address!r} is unreachable ({err.strerror or err}); start the cluster "
                          "(`ray start --head`) or leave ray_address unset for a local Ray.") from None
