#!/usr/bin/env bash
# Prepares the GPU check (docs/GPU-CHECK.md) on this machine, which needs no GPU: builds the CUDA
# engines, packs them for the GPU machine's Python without their weights (the check makes them
# there from a seed), dry-runs the check on that pack, and prints the one device call to make.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=(qwen2-0.5b qwen2-moe-tiny)
MAX_CONTEXT=2048  # a 1024-token prefill, and 128 + 128 tokens for decode, with room to spare
GPU_PYTHON=3.12   # the GPU machine's python3
ENGINES=engines/gpu
PACK=engines/gpu-pack
TRAVEL_LIMIT_MIB=64  # what a device call carries: the working tree and the pack together
PYTHON=${PYTHON:-python3}

# Always rebuilt: an engine left from older code would be checked with the new qwen2c.
engines=()
for model in "${MODELS[@]}"; do
  echo "== building $model for cuda (max context $MAX_CONTEXT)"
  qwen2c build --model "$model" --target cuda --max-context "$MAX_CONTEXT" -o "$ENGINES/$model" --force
  engines+=("$ENGINES/$model")
done

echo "== packing for Python $GPU_PYTHON, without weights or tokenizer"
qwen2c pack "${engines[@]}" -o "$PACK" --python "$GPU_PYTHON" --no-weights --no-tokenizer --force

echo "== dry run of the check on the pack"
dry=$(mktemp -d)  # the weights it makes (about 1 GB) must not land in the pack, which travels
trap 'rm -rf "$dry"' EXIT
# -P: python -m would import the checkout's qwen2c/ from the current folder, not the pack's.
(. "$PACK/env.sh" && "$PYTHON" -P -m qwen2c.gpu_check --pack "$PACK" --out "$dry" --dry-run)

pack_bytes=$(du -sb "$PACK" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (pack_bytes + tree_bytes) / 1048576 ))
echo "== pack $(( pack_bytes / 1048576 )) MiB + working tree $(( tree_bytes / 1048576 )) MiB = $total_mib MiB of the $TRAVEL_LIMIT_MIB MiB a device call carries"
if (( total_mib >= TRAVEL_LIMIT_MIB )); then
  echo "too large to carry; nothing to run" >&2
  exit 1
fi
cat <<'CALL'
== ready. The device call (one call, at most 8 minutes; results come back as results.json and logs):
run(command="bash tools/gpu_check.sh", carry=["engines/gpu-pack"], timeout_s=480)
CALL
