#!/usr/bin/env bash
# The two commands of the README's quick start. Each sets everything up first if needed (a virtual environment in
# .venv, the CPU build of torch, this package with its extras), then runs:
#
#   ./run.sh main-job [train_hf.py options]   the main job (python train_hf.py ...)
#   ./run.sh tests [pytest options]           the test suite (python -m pytest ...), offline
#
# TORCH_INDEX_URL chooses where torch comes from: by default PyTorch's CPU-only wheel index (a bare `torch` from the
# public index is a multi-GB CUDA build); a CUDA index such as .../whl/cu128 for a GPU build; `default` for whatever
# index pip is already configured with (the CI machines serve the CPU build from local disk).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false

TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

setup() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    if ! python -c "import torch" 2>/dev/null; then
        python -m pip install --quiet --upgrade pip
        if [ "$TORCH_INDEX_URL" = default ]; then
            python -m pip install --quiet "torch==$TORCH_VERSION"
        else
            # The CPU index holds torch's own dependencies too; the public index stays reachable for the rest.
            python -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" \
                --extra-index-url https://pypi.org/simple
        fi
    fi
    # mdf-mllm-train is on PATH only once this version of the package is installed (./mdf_mllm imports from here
    # without it).
    if ! python -c "import pytest, gradio, bitsandbytes" 2>/dev/null || ! command -v mdf-mllm-train >/dev/null; then
        python -m pip install --quiet -e ".[test,demo,quantization]"
    fi
}

browser() {
    # The demo's end-to-end test drives headless Chromium through chromedriver (Debian's packages).
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
        else
            echo "note: chromium and chromedriver are missing; install them (apt-get install chromium chromium-driver) for the demo test" >&2
        fi
    fi
}

case "${1:-}" in
    main-job) shift; setup; exec python train_hf.py "$@" ;;
    tests) shift; setup; browser; exec python -m pytest "$@" ;;
    *) echo "usage: ./run.sh main-job [train_hf.py options] | ./run.sh tests [pytest options]" >&2; exit 2 ;;
esac
