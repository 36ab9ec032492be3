#!/usr/bin/env bash
# Set up a virtual environment from this project's own files, then run one job:
#   bash quickstart.sh demo   the main job: writes the demo data, trains and evaluates on them
#   bash quickstart.sh test   the test suite (without the `heavy` subprocess training runs)
# VENV (default .venv) picks the environment; PIP_CONSTRAINT pins versions (CI uses .ci/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-demo}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
case "$job" in
  demo)
    "$py" -m pip install -q -e .
    # the demo's data, in MUSE's released layout (configs/demo.yaml reads them)
    "$venv/bin/pixellm" prepare-data --source synthetic --layout muse --out runs/demo_data \
        --split train --split val --num-samples 1500 150 --overwrite
    exec "$venv/bin/pixellm" train --config demo
    ;;
  test)
    "$py" -m pip install -q -e '.[dev]'
    exec "$py" -m pytest -q -n "${PYTEST_WORKERS:-2}" -m "not heavy" tests
    ;;
  *)
    echo "usage: bash quickstart.sh demo|test" >&2
    exit 2
    ;;
esac
