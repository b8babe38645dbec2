#!/usr/bin/env bash
# The GPU check (docs/GPU-CHECK.md), run on the lent GPU machine from the repository root with
# engines/gpu-pack carried (tools/prepare_gpu_check.sh makes it and prints the call). Everything it
# runs comes from the pack; results.json and the logs go to $OUT. Extra arguments go to the check
# (e.g. --budget-s 200 for a shorter rerun).
set -uo pipefail
cd "$(dirname "$0")/.."

PACK=${GPU_CHECK_PACK:-engines/gpu-pack}  # another pack: tests dry-run this script on theirs
: "${OUT:?OUT is the folder whose files come back from the device machine}"
if [[ ! -f "$PACK/env.sh" ]]; then
  echo "no $PACK/env.sh: run tools/prepare_gpu_check.sh first and carry $PACK" >&2
  exit 2
fi
. "$PACK/env.sh"
# The card as found (driver, memory in use, clocks), for the log only.
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
# -P: from the repository root, python -m would import the checkout's qwen2c/, not the pack's.
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" -P -m qwen2c.gpu_check --pack "$PACK" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
