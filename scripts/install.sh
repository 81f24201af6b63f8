#!/usr/bin/env bash
# Installs everything rayclip needs on a fresh Debian machine, as root: the real data sets (Debian
# packages) and the Python stack pinned in constraints.txt, with the project itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# g++: DeepSpeed JIT-builds its CPU communication op, and torch.compile (model.compile) generates C++ on CPU.
packages="dataset-fashion-mnist tuxpaint-stamps-default mate-backgrounds g++"
if ! dpkg -s $packages >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -c constraints.txt -e ".[test,bench]"
