#!/bin/bash
# One-shot GPU check on the device machine (run from the repository root, with .gpu/ from prepare.sh carried):
#   BUDGET=540 bash benchmarks/gpu/check.sh
# The CUDA paths of the plugin with stand-in weights (benchmarks/standin_models.py): resume on CUDA, the Laser
# item refresh and training throughput at the paper profile, SeRALM/base evaluation time, and the tiny-model
# tests of the LLM paths. Every step has its own time limit and log; a failed step does not stop the next.
# Results go to $OUT (the device tool brings that folder back).
set -u
export PYTHONUNBUFFERED=1 RECBOLE_LLM_CACHE=/tmp/rlcache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT" /tmp/steplogs
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET:-540}))
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
step() {  # step NAME MAXSECONDS cmd...
  local name=$1 max=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 20 ]; then el "SKIP $name (no time left)"; return; fi
  el "START $name (limit ${t}s)"
  timeout --kill-after=5 "$t" "$@" > "/tmp/steplogs/$name.log" 2>&1
  el "END $name rc=$?"; tail -n 8 "/tmp/steplogs/$name.log"
  { echo "===== $name"; cat "/tmp/steplogs/$name.log"; } >> "$OUT/steps.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys,torch,transformers,numpy;print(sys.version.split()[0],torch.__version__,transformers.__version__,numpy.__version__)"
W=.gpu/whl
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
$PIP $W/recbole-*.whl $W/colorlog-*.whl $W/texttable-*.whl $W/pandas-*.whl $W/pytz-*.whl $W/tzdata-*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 benchmarks/standin_models.py build .gpu/standin-src /tmp/standin 2>&1 | grep -v Writing
SMOKE='from recbole_llm.llm.loader import load_causal_lm, load_text_encoder
m, t = load_causal_lm("/tmp/standin/llm"); e, _ = load_text_encoder("/tmp/standin/encoder")
print("smoke", m.device, m.dtype, e.device, type(m).__name__)'
if ! python3 -c "$SMOKE" 2>/tmp/smoke1.err; then
  el "the image's transformers failed; using the carried one"; tail -3 /tmp/smoke1.err
  $PIP $W/transformers-*.whl $W/huggingface_hub-*.whl $W/httpx2-*.whl $W/httpcore2-*.whl
  python3 -c "$SMOKE"
fi
SI="llm_path=/tmp/standin/llm encoder_path=/tmp/standin/encoder"
# 1. --resume on CUDA: tiny aligned SeRALM and tiny Laser, killed mid-run, resumed
step resume_cuda 90 python3 benchmarks/gpu/resume_check.py
# 2. Laser item refresh against the backbone (the row assembly is 45 ops per batch since the column-range rewrite)
step speed_refresh 110 python3 benchmarks/speed.py --gpu --sections refresh --repeats 3 \
  --results-dir "$OUT/speed-refresh" --work-dir /tmp/bench --timeout 105 --set $SI frozen_sr_epochs=5
# 3. training samples/s and SeRALM/base evaluation time
step speed_train 130 python3 benchmarks/speed.py --gpu --sections train eval --models Laser SASRec SASRecSeRALM \
  --repeats 3 --train-batches 20 --results-dir "$OUT/speed-train" --work-dir /tmp/bench --timeout 60 \
  --set $SI frozen_sr_epochs=5
# 4. the tiny-model tests of the LLM paths (the tests that leave use_gpu at its default run on CUDA)
step pytest_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/laser/test_laser.py tests/seralm/test_alignment.py \
  tests/llm/test_llm.py --deselect tests/llm/test_llm.py::test_bundled_paths_exist
nvidia-smi --query-gpu=memory.used --format=csv,noheader
tar czf "$OUT/logs.tgz" /tmp/steplogs /tmp/bench/logs 2>/dev/null
el done
