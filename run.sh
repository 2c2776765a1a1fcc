#!/usr/bin/env bash
# The two commands of the README's quick start. Each sets up first what it needs and is missing, then runs:
#
#   ./run.sh main-job [train_hf.py options]   the main job (python train_hf.py ...): a virtual environment in .venv,
#                                             the CPU build of torch, this package and its runtime dependencies
#   ./run.sh tests [pytest options]           the test suite (python -m pytest ...), offline: the same, plus the
#                                             extras (test, demo, quantization) and Chromium for the demo's test
#
# TORCH_INDEX_URL chooses where torch comes from: by default PyTorch's CPU-only wheel index (a bare `torch` from the
# public index is a multi-GB CUDA build); a CUDA index such as .../whl/cu128 for a GPU build; `default` for whatever
# index pip is already configured with (the CI machines serve the CPU build from local disk). An index that does not
# answer within 5 s is left for pip's configured index, with one line that says so.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false

TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
ALL_EXTRAS=test,demo,quantization

setup() {
    # $1: the package's extras, e.g. "test,demo,quantization" ("" for none). A stamp in .venv names what was installed
    # for which pyproject.toml, so a later command that needs nothing more starts at once (no pip, no imports).
    local extras=$1 stamp=.venv/mdf-mllm-installed want
    want="$(cksum < pyproject.toml) [$extras]"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        # The pip that venv bundles resolves this package's dependencies 10 s slower than a current one (bench/).
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    if [ -f "$stamp" ] && grep -qxF -e "$want" -e "$(cksum < pyproject.toml) [$ALL_EXTRAS]" "$stamp"; then
        return
    fi
    local packages=(-e ".${extras:+[$extras]}")
    if ! python -m pip show --quiet torch 2>/dev/null; then
        if [ "$TORCH_INDEX_URL" != default ] && ! answers "$TORCH_INDEX_URL"; then
            echo "note: $TORCH_INDEX_URL did not answer within 5 s; torch $TORCH_VERSION comes from pip's configured index" >&2
            TORCH_INDEX_URL=default
        fi
        if [ "$TORCH_INDEX_URL" = default ]; then
            packages+=("torch==$TORCH_VERSION")  # one resolution for torch and the package
        else
            # torch alone from PyTorch's index; its dependencies come with the package's from pip's configured index.
            python -m pip install --quiet --no-compile --no-deps "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
        fi
    fi
    # --no-compile: Python compiles a module when it is first imported, so only what runs is compiled (as uv does).
    python -m pip install --quiet --no-compile "${packages[@]}"
    echo "$want" >> "$stamp"
}

answers() {
    # Whether the index at $1 serves torch's page within 5 s (pip would retry a dead index for minutes).
    python - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
PY
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
    main-job) shift; setup ""; exec python train_hf.py "$@" ;;
    tests) shift; setup "$ALL_EXTRAS"; browser; exec python -m pytest "$@" ;;
    *) echo "usage: ./run.sh main-job [train_hf.py options] | ./run.sh tests [pytest options]" >&2; exit 2 ;;
esac
