#!/usr/bin/env bash
# Installs the Debian packages dmc needs and builds it into build/ (Release).
# CUDA is used when nvcc is found (/usr/local/cuda or PATH); DMC_CUDA=OFF skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake ninja-build pkg-config libopenmpi-dev openmpi-bin libhdf5-dev
          libabsl-dev libgtest-dev libsentencepiece-dev sentencepiece nlohmann-json3-dev
          gnuplot-nox libcpp-httplib-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

jobs="${DMC_BUILD_JOBS:-$(nproc)}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMC_CUDA="${DMC_CUDA:-AUTO}" >/dev/null
cmake --build build -j "$jobs"
