#!/usr/bin/env bash
# The GPU column of docs/memory.md: bench/memory.py's points on one GPU, most valuable first, each command cut at
# a shared deadline so one run of at most DEADLINE seconds brings back every point measured before it.
#
#   bash bench/gpu_memory.sh OUT_DIR [DEADLINE_S] [split]     # on a GPU; every point goes into OUT_DIR/memory_gpu.json
#
# `split`: only the points of --offload_layers (the second H200 session): Llama-3.1-8B past 400k tokens with the
# first 15 layers' checkpoints on the host (60 GiB pinned, under half of a 125 GiB host) and the rest on the GPU,
# and offloading's cost (tokens/s with and without it) at 32k.
set -u
out=${1:?usage: bash bench/gpu_memory.sh OUT_DIR [DEADLINE_S]}
end=$((SECONDS + ${2:-520}))
mkdir -p "$out"
step() {  # one bench/memory.py command, cut at the deadline
  local left=$((end - SECONDS))
  if [ "$left" -lt 20 ]; then echo "skipped (deadline): $*"; return; fi
  echo "== $* (limit ${left}s)"
  timeout "$left" python3 bench/memory.py --search_longest false --json "$out/memory_gpu.json" \
    --output "$out/last.md" "$@" || echo "exit $?: $*"
}
if [ "${3:-}" = split ]; then
  step --models llama-3.1-8b --contexts 409600 --variants ours_lora --steps 1 --offload_layers 15
  step --models llama-2-7b --contexts 32768 --variants ours ours_no_offload --steps 3
  step --models llama-3.1-8b --contexts 458752 --variants ours_lora --steps 1 --offload_layers 15
  exit 0
fi
python3 bench/s2_speed.py --device cuda --dtype bfloat16 --heads 32 --lengths 65536 131072 --output "$out/s2_speed_long.md" || echo "s2_speed failed"
step --models llama-2-7b --contexts 16384 32768 --variants ours ours_full_attention baseline ours_no_offload
step --models llama-2-7b --contexts 65536 --variants ours baseline
step --models llama-2-13b --contexts 12288 --variants ours baseline
step --models llama-3.1-8b --contexts 32768 65536 --variants ours_lora --steps 1
step --models llama-3.1-8b --contexts 131072 --variants ours_lora_no_offload --steps 1
step --models llama-2-70b --contexts 16384 --variants ours_lora --steps 1
step --models llama-3.1-8b --contexts 262144 --variants ours_lora_no_offload --steps 1
