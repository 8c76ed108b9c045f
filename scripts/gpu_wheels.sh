#!/usr/bin/env bash
# Wheels scripts/gpu_check.sh needs on the device image (Python 3.12, torch/transformers/accelerate/safetensors already
# there; see /work/.library/device/KINDS.md): this project's config stack, peft at the pinned range, bitsandbytes for
# the QLoRA step. Downloaded here into .whl/ (git-ignored through .git/info/exclude), carried with `carry: [".whl"]`,
# installed there with: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 "peft>=0.21,<0.22" bitsandbytes==0.50.2 gguf PyYAML
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as a source archive only: build its pure-Python wheel
$PIP wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
