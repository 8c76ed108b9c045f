#!/usr/bin/env bash
# The prepared GPU check (one device call): the GPU-relevant tests, `bench.py --paper-shape` on CUDA at llama3-8b-shape
# (all 32 layers, r=32, E=4, targets q,k,v,up,down, bf16 base, batch 8 x 256) for the six methods with the dry run's
# memory estimate beside the measured peak, compiled vs eager, and a QLoRA (NF4) step per mixture. Results go to
# $OUT (default results/bench): gpu_paper_shape.json, gpu_engines.json, gpu_qlora_step.json, and the log.
# DRY=1 runs every step on CPU at toy sizes (tested on CPU before any device call). On a lent GPU: run
# scripts/gpu_wheels.sh here first, then one device call with carry [".whl"]:
#   OUT=$OUT PYTHONUNBUFFERED=1 scripts/gpu_check.sh      (well under 10 minutes on one H100 is the plan; not yet run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-results/bench}
# On the device image: the carried wheels (scripts/gpu_wheels.sh) and this checkout's source, no install needed
if [ -d .whl ] && [ "${DRY:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu
  SHAPE=(--num-layers 1 --vocab-size 512 --batch 1 --seq 24 --steps 1 --warmup 0)
  QL=(--num-layers 1 --hidden 64 --vocab-size 512 --batch 1 --seq 16)
  TESTS=(tests/test_scale.py -k "bf16 or checkpointing_observes")
else
  DEV=cuda
  SHAPE=()
  QL=()
  TESTS=(tests/test_scale.py tests/test_methods.py tests/test_routing.py)
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)"
fi
date
echo "== tests"
$PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
echo "== paper-shape bench (six methods, estimate vs peak)"
$PY scripts/bench.py --paper-shape --device "$DEV" "${SHAPE[@]}" --methods lora,dora,hira,moelora,teamlora,talklora --out "$OUT"
echo "== QLoRA NF4 step per mixture"
$PY scripts/qlora_step.py --device "$DEV" "${QL[@]}" --out "$OUT"
date
