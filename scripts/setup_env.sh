#!/usr/bin/env bash
# Create (or reuse) .venv and install the package with the pins the CPU environment uses.
# torch/torchvision are pinned so pip takes the build that lies on this machine's disk instead of downloading one.
# transformers' video processor decodes video files only with torchcodec, which loads FFmpeg's shared libraries
# (4 to 8) from the system: where apt-get exists and we are root, the Debian 12 ones are installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# FFmpeg 5.1 shared libraries (Debian 12 names). Offline and already installed: nothing is fetched, no failure.
FFMPEG_PACKAGES=(libavcodec59 libavformat59 libavutil57 libswscale6 libavdevice59 libavfilter8 libswresample4)
install_ffmpeg_libs() {
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 || return 0
  [ "$(id -u)" = 0 ] || return 0
  local missing=() p
  for p in "${FFMPEG_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  export DEBIAN_FRONTEND=noninteractive
  # Try the local package lists first; refresh them (apt-get update) only when that fails.
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    if ! { apt-get update -qq >/dev/null 2>&1 &&
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }; then
      echo "setup_env: could not install ${missing[*]}; torchcodec will not decode video files" >&2
    fi
  fi
}
install_ffmpeg_libs

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torchcodec (the dev extra pins it too) decodes video for transformers' processor in the parity tests.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" \
  "torchcodec==${TORCHCODEC_VERSION:-0.17.*}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, videollama3_train; print('torch', torch.__version__, '| transformers', transformers.__version__)"
.venv/bin/python -c "import torchcodec; from torchcodec.decoders import VideoDecoder; print('torchcodec', torchcodec.__version__)" 2>/dev/null ||
  echo "setup_env: torchcodec cannot load (FFmpeg shared libraries missing?); video-path tests will fail under CI" >&2
