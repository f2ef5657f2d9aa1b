#!/usr/bin/env bash
# One-shot GPU check of NaViL: precision of bf16/fp16 against the golden float32 outputs, decode speed of the
# NaViL-2B shape against the GPU's bandwidth limit, time to first token of a 1024x1024 image, bitsandbytes 8/4-bit
# chat, flash_attention_2 (when installed) and the fast image processor on the GPU. Prints one table; exits non-zero
# when a check fails.
#
#   bash benchmarks/gpu_check.sh [--json out.json]        # a CUDA GPU: under 8 minutes on an H100/H200
#   bash benchmarks/gpu_check.sh --cpu [--json out.json]  # dry run of every step with small shapes on the CPU
#
# Needs no network and no installation: a copy of the working tree and a Python with torch and transformers. Wheels
# in $NAVIL_WHEELS (default: .whl/ in the repository), e.g. bitsandbytes or flash-attn, are installed first from
# those files alone. The checks themselves are in benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}

wheels=${NAVIL_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/navil-gpu-check/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/navil-gpu-check/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c "import navil" 2>/dev/null; then
    # the repository root is the package `navil`: import it through a link instead of installing it
    mkdir -p /tmp/navil-gpu-check/path
    ln -sfn "$PWD" /tmp/navil-gpu-check/path/navil
    export PYTHONPATH=/tmp/navil-gpu-check/path${PYTHONPATH:+:$PYTHONPATH}
fi
# 470 s leaves the caller of an 8-minute slot time to collect the output
exec timeout "${NAVIL_GPU_CHECK_TIMEOUT:-470}" "$python" benchmarks/gpu_check.py "$@"
