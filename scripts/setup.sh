#!/usr/bin/env bash
# Create .venv at the repository root and install ibisagent with everything it needs, CPU-only and offline-safe.
# Order matters (docs/INSTALL.md): the torch/torchvision pair first, then sam2 built against that torch without
# build isolation (otherwise pip downloads a second torch to build it), then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed (monailabel 0.8.5 imports cgi/distutils), got {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "setuptools>=61,<81" wheel
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
.venv/bin/python -c 'import sam2' 2>/dev/null || SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation sam2==1.1.0
"${PIP[@]}" install -e ".[dev]"
echo "ibisagent installed in .venv ($(.venv/bin/python -c 'import ibisagent; print(ibisagent.__version__)'))"
