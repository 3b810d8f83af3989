#!/usr/bin/env bash
# Installs everything the pipeline needs and the project itself (`pip install -e .`: the packages
# pipeline, model and stages), idempotently, then prints the environment's bin folder.
#
# Where: the active virtualenv or (non-base) conda env if there is one — an Ascend user's env with
# torch 2.1 + torch_npu is used as it is — otherwise `.venv/` in the repository root.
# The slow step is mmcv-full (built from source with ops); its wheel is cached per torch version,
# Python version and machine under $SPARSE4D_CACHE (default ~/.cache/sparse4d-pipeline), and a
# wheel built against one torch is never reused with another.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req=$root/requirements
cache=${SPARSE4D_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse4d-pipeline}
mmcv_version=1.7.2

if [ -n "${VIRTUAL_ENV:-}" ] && [ "$VIRTUAL_ENV" != "$root/.venv" ]; then
  prefix=$VIRTUAL_ENV
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != "base" ]; then
  prefix=$CONDA_PREFIX
else
  prefix=$root/.venv
  if [ ! -x "$prefix/bin/python" ]; then
    echo "setup: creating $prefix" >&2
    python3 -m venv "$prefix"
  fi
fi
py=$prefix/bin/python

installed_here() {
  # The project is installed (editable) and points at this checkout, not another one.
  (cd / && "$py" -c 'import os, sys, pipeline, stages
sys.exit(os.path.realpath(os.path.dirname(pipeline.__path__[0])) != os.path.realpath(sys.argv[1]))' "$root") 2>/dev/null
}

# A stamp named after the hash of everything that decides the install makes the second run instant.
stamp=$prefix/.sparse4d-setup-$(cat "$req"/*.txt "$root/scripts/setup.sh" | sha256sum | cut -c1-16)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pipq() {
  # pip, quiet unless it fails; the local mirrors' "is ignored" warnings are noise.
  if ! "$py" -m pip --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -n 40 >&2
    echo "setup: pip $* failed" >&2
    exit 1
  fi
}

install_project() {
  # No dependencies (requirements/ has them) and no build isolation: works offline, in seconds.
  if ! installed_here; then
    echo "setup: installing the project (pip install -e $root)" >&2
    if ! "$py" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null; then
      pipq install -q "setuptools>=64,<70"  # editable installs from pyproject.toml (PEP 660)
    fi
    "$py" -c "import wheel" 2>/dev/null || pipq install -q wheel  # setuptools < 70.1 builds with it
    pipq install -q --no-deps --no-build-isolation -e "$root"
  fi
}

if [ -f "$stamp" ] && "$py" -c "import torch, mmcv.ops, mmdet.models, nuscenes, dvc" 2>/dev/null; then
  install_project
  echo "$prefix/bin"
  exit 0
fi

echo "setup: installing into $prefix" >&2
pipq install -q --upgrade pip wheel
if "$py" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')" >&2
else
  echo "setup: installing torch (requirements/torch.txt)" >&2
  pipq install -q -r "$req/torch.txt"
fi
pipq install -q -r "$req/base.txt"

if "$py" -W ignore -c "import mmcv, mmcv.ops; assert mmcv.__version__.startswith('1.')" 2>/dev/null; then
  echo "setup: keeping the installed mmcv-full $("$py" -W ignore -c 'import mmcv; print(mmcv.__version__)')" >&2
else
  key=$("$py" -c "import platform, sys, torch; print(f'torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}')")
  wheels=$cache/wheels/mmcv-full-$mmcv_version/$key
  if ! ls "$wheels"/mmcv_full-*.whl >/dev/null 2>&1; then
    echo "setup: building mmcv-full $mmcv_version with ops against $key (about 8 minutes on 2 cores)" >&2
    build=$(mktemp -d)
    # mmcv's setup.py imports pkg_resources, which setuptools >= 70 no longer ships.
    pipq install -q "setuptools<70"
    pipq download -q --no-deps --no-binary :all: --no-build-isolation "mmcv-full==$mmcv_version" -d "$build"
    tar -xzf "$build/mmcv-full-$mmcv_version.tar.gz" -C "$build"
    src=$build/mmcv-full-$mmcv_version
    # torch >= 2.14 headers need C++20; mmcv forces -std=c++14/17.
    if "$py" -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 14) else 1)"; then
      sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$src/setup.py"
    fi
    (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip --disable-pip-version-check \
      wheel --no-deps --no-build-isolation -w "$build/dist" . >"$log" 2>&1) || {
      tail -n 60 "$log" >&2
      echo "setup: building mmcv-full failed" >&2
      exit 1
    }
    mkdir -p "$wheels"
    # Atomic: a wheel appears in the cache only once it is complete.
    for whl in "$build"/dist/mmcv_full-*.whl; do
      cp "$whl" "$wheels/.$(basename "$whl").tmp"
      mv "$wheels/.$(basename "$whl").tmp" "$wheels/$(basename "$whl")"
    done
    rm -rf "$build"
  fi
  pipq install -q --no-deps --force-reinstall "$wheels"/mmcv_full-*.whl
fi
pipq install -q -r "$req/openmmlab.txt"
install_project

"$py" -W ignore -c "import torch, mmcv.ops, mmdet.models, nuscenes, dvc" >"$log" 2>&1 || {
  cat "$log" >&2
  echo "setup: the environment in $prefix does not import (torch, mmcv.ops, mmdet.models, nuscenes, dvc)" >&2
  exit 1
}
rm -f "$prefix"/.sparse4d-setup-*
touch "$stamp"
echo "$prefix/bin"
