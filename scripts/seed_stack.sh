#!/usr/bin/env bash
# The quick test suite on the seed's torch: a second environment with torch 2.1.0 / torchvision 0.16.0
# (their cp311 x86_64 wheels), mmcv-full built against that torch by scripts/setup.sh (its wheel cached
# per torch version as usual) and the rest of requirements/ added around it, then
# `pytest -m "not slow"` (the parity tests included).
#
#   bash scripts/seed_stack.sh [pytest args]     # environment: $SEED_VENV (default .venv-seed/)
#
# A first run downloads about 2.5 GB (torch 2.1.0 with its CUDA libraries) and builds mmcv-full
# (about 9 minutes on 2 cores); a second run only tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${SEED_VENV:-$root/.venv-seed}
if [ ! -x "$venv/bin/python" ]; then
  echo "seed_stack: creating $venv" >&2
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.1.0'))" 2>/dev/null; then
  echo "seed_stack: installing torch 2.1.0 and torchvision 0.16.0" >&2
  "$venv/bin/python" -m pip --disable-pip-version-check install -q torch==2.1.0 torchvision==0.16.0
fi
# The active-environment branch of the set-up: torch is kept, mmcv-full is built against it, the
# rest is added at its pins.
bin=$(VIRTUAL_ENV=$venv bash scripts/setup.sh | tail -n 1)
"$bin/python" -c "import torch, mmcv; print(f'seed_stack: torch {torch.__version__}, mmcv-full {mmcv.__version__}')"
exec "$bin/python" -m pytest -m "not slow" "$@"
