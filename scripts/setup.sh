#!/usr/bin/env bash
# Installs everything the pipeline needs and the project itself (`pip install -e .`: the packages
# pipeline, model and stages), idempotently, then prints the environment's bin folder.
#
# Where: the active virtualenv or (non-base) conda env if there is one — an Ascend user's env with
# torch 2.1 + torch_npu is used as it is: what is installed at a compatible version is kept and only
# the rest is added (scripts/env_requirements.py), so its torch, torch_npu, mmcv and numpy stay —
# otherwise `.venv/` in the repository root, with requirements/ installed exactly as pinned.
# Python 3.9 or newer (dvc 3.67.1, like every dvc since 3.43.0, needs it).
# The slow step is mmcv-full (built from source with ops); its wheel is cached per torch version,
# Python version and machine under $SPARSE4D_CACHE (default ~/.cache/sparse4d-pipeline), and a
# wheel built against one torch is never reused with another.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req=$root/requirements
cache=${SPARSE4D_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse4d-pipeline}
mmcv_version=1.7.2

active=1
if [ -n "${VIRTUAL_ENV:-}" ] && [ "$VIRTUAL_ENV" != "$root/.venv" ]; then
  prefix=$VIRTUAL_ENV
elif [ -n "${CONDA_PREFIX:-}" ] && [ "${CONDA_DEFAULT_ENV:-base}" != "base" ]; then
  prefix=$CONDA_PREFIX
else
  active=0
  prefix=$root/.venv
fi
py=$prefix/bin/python

# Python 3.8 resolves nothing: stop before creating or changing anything.
base_py=$py
[ -x "$base_py" ] || base_py=python3
if ! "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
  echo "setup: $("$base_py" -V 2>&1) is too old: dvc 3.67.1 (requirements/base.txt; every dvc since 3.43.0) needs Python >= 3.9" >&2
  exit 1
fi

if [ "$active" = 0 ]; then
  if [ ! -x "$prefix/bin/python" ]; then
    echo "setup: creating $prefix" >&2
    python3 -m venv "$prefix"
  fi
fi

installed_here() {
  # The project is installed (editable) and points at this checkout, not another one.
  (cd / && "$py" -c 'import os, sys, pipeline, stages
sys.exit(os.path.realpath(os.path.dirname(pipeline.__path__[0])) != os.path.realpath(sys.argv[1]))' "$root") 2>/dev/null
}

# A stamp named after the hash of everything that decides the install makes the second run instant.
stamp=$prefix/.sparse4d-setup-$(cat "$req"/*.txt "$root"/scripts/setup.sh "$root"/scripts/env_requirements.py | sha256sum | cut -c1-16)
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

install_requirements() {
  # requirements files -> the environment. .venv: exactly as pinned. An active environment: only
  # what is missing or incompatible (scripts/env_requirements.py), printed, with everything kept
  # (its torch, torch_npu, mmcv, numpy) as constraints, so pip fails rather than replace them.
  if [ "$active" = 0 ]; then
    local f
    for f in "$@"; do pipq install -q -r "$f"; done
    return
  fi
  local cons adds report files
  files=$(printf ' %s' "${@#"$root"/}")
  cons=$(mktemp)
  report=$(mktemp)
  adds=$("$py" "$root/scripts/env_requirements.py" --constraints "$cons" "$@") || {
    echo "setup: scripts/env_requirements.py failed" >&2
    exit 1
  }
  if [ -z "$adds" ]; then
    echo "setup:$files: all installed at compatible versions; adding nothing" >&2
  else
    echo "setup: adding to $prefix (the rest of$files is kept as installed):" >&2
    printf '%s\n' "$adds" | sed 's/\t/  # /; s/^/setup:   /' >&2
    # shellcheck disable=SC2046  # one requirement (name==version, no spaces) per line
    pipq install -c "$cons" --report "$report" $(printf '%s\n' "$adds" | cut -f1)
    echo "setup: pip installed (the above and their dependencies): $("$py" -c '
import json, sys
items = json.load(open(sys.argv[1]))["install"]
print(" ".join(sorted(i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in items)) or "nothing")' "$report")" >&2
  fi
  rm -f "$cons" "$report"
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
install_requirements "$req/base.txt"

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
install_requirements "$req/openmmlab.txt"
install_project

"$py" -W ignore -c "import torch, mmcv.ops, mmdet.models, nuscenes, dvc" >"$log" 2>&1 || {
  cat "$log" >&2
  echo "setup: the environment in $prefix does not import (torch, mmcv.ops, mmdet.models, nuscenes, dvc)" >&2
  exit 1
}
rm -f "$prefix"/.sparse4d-setup-*
touch "$stamp"
echo "$prefix/bin"
