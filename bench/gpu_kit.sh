#!/bin/bash
# Readies a lent GPU's one call (README, Performance, "On a GPU"). Run here, in the repository's root:
#
#   bash bench/gpu_kit.sh wheels   # the packages the device's Python lacks, as wheels in .whl/ (.gitignore has it)
#   bash bench/gpu_kit.sh aside    # the default model's text encoder (45 MB) moved out of the tree: what a call
#                                  # sends is capped at 64 MiB and the tree is over it; nothing on the GPU needs it
#   bash bench/gpu_kit.sh back     # puts it back (or: git checkout -- latentgen/default_model/text_encoder)
#
# Then `run`s with carry [".whl"]: `bash bench/gpu_kit.sh on-device PART...`, parts whose limits add up to under
# 600 s, one call's most (on 4 Dec a lease's 15 minutes held `tests split inference`, 418 s, then `unet`, 260 s,
# each call with a machine's start of a minute or two).
# A call installs the wheels (once per machine), then runs the CUDA tests or a bench/gpu.py section in its own
# process under its own time limit (a hang in one leaves the others' figures), all printed into $OUT/log.txt and
# each section's table into $OUT/SECTION/gpu.json.
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
    for name in hjson ninja py-cpuinfo msgpack einops; do  # DeepSpeed's (the zero part)
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$(version "$name")"
    done
    .venv/bin/pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"  # an sdist: its ops build on use
    du -sh .whl ;;
  aside) mv "$ENCODER" "$ASIDE" && echo "moved $ENCODER to $ASIDE" ;;
  back) mv "$ASIDE" "$ENCODER" && echo "put $ENCODER back" ;;
  on-device)
    shift
    [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
    log=$OUT/log.txt
    set +e -o pipefail
    { nvidia-smi -L; python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__,
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$log"
    section() { local limit=$1; shift; echo "== $* (limit ${limit} s)" | tee -a "$log"; local start=$SECONDS
                timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E 'it/s\]|s/it\]' | tee -a "$log"
                echo "== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"; }
    declare -A limit=([tests]=120 [peak]=75 [inference]=280 [training]=150 [unet]=130 [graphs]=140 [split]=150 [tuned]=560
                      [zero]=240)
    [ $# -gt 0 ] || set -- tests peak inference
    for part in "$@"; do
      [ -n "${limit[$part]:-}" ] || { echo "unknown part $part" | tee -a "$log"; continue; }
      if [ "$part" = tests ]; then section "${limit[tests]}" python3 -m pytest -q -m cuda tests/test_cuda.py
      else section "${limit[$part]}" python3 bench/gpu.py --only "$part" --folder /tmp/sd --repeat 2 --out "$OUT/$part"
      fi
    done ;;
  *) echo "usage: bash bench/gpu_kit.sh wheels|aside|back|on-device [tests|peak|inference|training|unet|graphs|split|tuned|zero ...]" >&2; exit 2 ;;
esac
