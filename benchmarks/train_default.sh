#!/usr/bin/env bash
# Train + evaluate + package the embedded default model (issue 11) in one GPU call.
#   bash benchmarks/train_default.sh OUT_DIR      (TRAIN_BUDGET_S=300 by default)
# Needs the carried corpus build/default_model/ (python -m stream_attention.models.data).
# Writes default_model.tar.part-aa/-ab, metrics.json, loss.png, train_log.json, train.log, eval.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/train_default.py --out "${1:-${OUT:-out/train_default}}" \
  --time-budget-s "${TRAIN_BUDGET_S:-300}" "${@:2}"
