#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine, idempotently:
#   - Debian's Fashion-MNIST (the offline default dataset)
#   - a virtual environment in .venv with the project installed (editable) and its test extras
# Re-running it is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Installing torch==2.14.1 + torchvision==0.29.1 takes a few minutes the first time.
if ! .venv/bin/python -c "import pipeline_lib, torch, dvc, mlflow, pyautoattack, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.arpipe-installed ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch .venv/.arpipe-installed
fi
echo "setup done: activate with '. .venv/bin/activate'"
