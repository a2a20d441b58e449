#!/usr/bin/env bash
# The performance issue's CPU table: fp32, bf16-mixed and the reference, training and guided sampling, for
# the demo's DiT-Ti/4 and for DiT-S/4 and DiT-B/4, one bench.py process per size (about 15 minutes on 2 cores):
#
#   bash experiments/cpu_bench.sh      # JSON per size under $OUT (default experiments/bench_results)
#
# Needs the whole machine: run nothing else meanwhile (bench.py records the load average and the
# process CPU time beside the wall time).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/bench_results}"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
common=(--device cpu --modes reference,ours,ours-bf16 --warmup 1 --repeats 5 --sample-steps 250 --out "$out")
# The demo: Fashion-MNIST in pixel space (1 channel, 32×32, 10 classes), batch 32.
"$python" experiments/bench.py "${common[@]}" --model DiT-Ti/4 --channels 1 --num-classes 10 --batch 32 \
    --steps 5 --tag ti4-b32
# The paper's sizes on 32×32×4 latents (ImageNet classes).
"$python" experiments/bench.py "${common[@]}" --model DiT-S/4 --batch 16 --steps 3 --tag s4-b16
"$python" experiments/bench.py "${common[@]}" --model DiT-B/4 --batch 16 --steps 2 --tag b4-b16
