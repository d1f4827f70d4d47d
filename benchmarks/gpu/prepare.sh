#!/bin/bash
# Here (a machine with the package registries): fill .gpu/ with what check.sh needs on a device machine that has
# no network: wheels for its Python and the bundled models' configs and tokenizers (no weights).
#   bash benchmarks/gpu/prepare.sh [PYTHON_VERSION]   # default 3.12, the device image's Python so far
# .gpu/ is about 35 MB; carry it to the device (it is git-ignored: name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-3.12}
mkdir -p .gpu/whl
# RecBole 1.2.1 and its small pure-Python dependencies; pandas 2.3.3, since RecBole 1.2.1 breaks on pandas 3 (string
# dtype, copy-on-write); a transformers stack in case the image's cannot load the models.
pip download -q --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
  recbole==1.2.1 colorlog==4.7.2 texttable==1.7.2 pandas==2.3.3 pytz tzdata \
  "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
  "huggingface_hub==$(python -c 'import huggingface_hub; print(huggingface_hub.__version__)')" \
  "httpx2==$(pip show httpx2 2>/dev/null | sed -n 's/^Version: //p')" \
  "httpcore2==$(pip show httpcore2 2>/dev/null | sed -n 's/^Version: //p')"
python benchmarks/standin_models.py export .gpu/standin-src
du -sh .gpu
