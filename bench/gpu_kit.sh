#!/bin/bash
# Readies a lent GPU's one call (README, Performance, "On a GPU"). Run here, in the repository's root:
#
#   bash bench/gpu_kit.sh wheels   # the packages the device's Python lacks, as wheels in .whl/ (.gitignore has it)
#   bash bench/gpu_kit.sh aside    # the default model's text encoder (45 MB) moved out of the tree: what a call
#                                  # sends is capped at 64 MiB and the tree is over it; nothing on the GPU needs it
#   bash bench/gpu_kit.sh back     # puts it back (or: git checkout -- latentgen/default_model/text_encoder)
#
# Then one `run` with carry [".whl"] and this command (each part's output lands under $OUT):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L &&
#   python3 -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee $OUT/tests.txt;
#   python3 bench/gpu.py --out $OUT 2>&1 | tee $OUT/bench.txt
#
# The device's Python has torch, transformers, accelerate, peft, safetensors, torchmetrics, timm, pandas and
# pyarrow (/work/.library/device/KINDS.md lists them); the wheels are the versions this checkout's .venv runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ENCODER=latentgen/default_model/text_encoder/model.safetensors
ASIDE=/tmp/latentgen-text-encoder.safetensors
case "${1:-}" in
  wheels)
    mkdir -p .whl
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    for name in diffusers importlib_metadata zipp open_clip_torch ftfy wcwidth omegaconf datasets dill multiprocess; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$(version "$name")"
    done
    du -sh .whl ;;
  aside) mv "$ENCODER" "$ASIDE" && echo "moved $ENCODER to $ASIDE" ;;
  back) mv "$ASIDE" "$ENCODER" && echo "put $ENCODER back" ;;
  *) echo "usage: bash bench/gpu_kit.sh wheels|aside|back" >&2; exit 2 ;;
esac
