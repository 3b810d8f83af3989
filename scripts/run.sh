#!/usr/bin/env bash
# The README's two entry points:
#   bash scripts/run.sh repro [dvc repro args]   install (idempotent), then run the pipeline
#   bash scripts/run.sh test  [pytest args]      install (idempotent), then run the test suite
#   bash scripts/run.sh train-node K [args]      install, then join node 0's training as node K (train.nnodes > 1)
#   bash scripts/run.sh profile full [args]      install, then run params-full.yaml as the DVC experiment "full"
# Any other command runs inside the installed environment: bash scripts/run.sh dvc metrics show
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin=$(bash scripts/setup.sh | tail -n 1)
export PATH="$bin:$PATH"
cmd=${1:-repro}
[ $# -gt 0 ] && shift
case "$cmd" in
  repro) exec dvc repro "$@" ;;
  test) exec python -m pytest "$@" ;;
  train-node) exec python -m stages.train --node-rank "$@" ;;
  profile) exec python -m pipeline.profiles "$@" ;;
  *) exec "$cmd" "$@" ;;
esac
