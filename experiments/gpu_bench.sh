#!/usr/bin/env bash
# The performance issue's GPU table in one go, sized for one H100 (about 7 minutes in all):
#
#   bash experiments/gpu_bench.sh           # JSON per point under $OUT (default experiments/bench_results)
#   bash experiments/gpu_bench.sh --smoke   # the same plan on a tiny model and torch.compile's aot_eager
#                                           # backend, on whatever device there is (a dry run for the CPU)
#
# Points, most important first (each is one bench.py process with its own time limit, so a failure or an
# out-of-memory costs only its own rows):
#   train-xl2-b32    XL/2 training at batch 32: reference (the anchors' 153 img/s) vs ours, ours-bf16
#   train-xl2-best   XL/2 training, best mode: bf16 + torch.compile at batch 128   (target >= 600 img/s)
#   sample-xl2       XL/2, 250 DDPM steps with guidance, batch 64                   (target >= 4 img/s)
#   train-b2         B/2 training at batch 256                                      (target >= 3000 img/s)
#   train-s2         S/2 training at batch 256, bf16, eager; with Lightning's per-step progress bar too
#   blocks-xl2-*     the other three blocks at XL/2, batch 32, bf16: with train-xl2-b32's adaln_zero row,
#                    throughput ratios between blocks against their Gflops ratios (printed at the end)
# Needs torch, lightning and timm (no Hydra, OmegaConf, W&B or diffusers); ditlab is taken from src/.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
    --smoke) smoke=1 ;;
    "") ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
out="${OUT:-experiments/bench_results}"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
started="$(mktemp)"
trap 'rm -f "$started"' EXIT
failed=0

# point TAG TIME_LIMIT_S MODEL BATCH [bench.py arguments...]
point() {
    local tag=$1 limit=$2 size=(--model "$3" --batch "$4")
    shift 4
    if ((smoke)); then
        limit=300
        size=(--model DiT-Ti/4 --depth 2 --input-size 8 --num-classes 10 --batch 2 --steps 1 --warmup 1
              --repeats 2 --sample-steps 4 --matmul-size 256 --compile-backend aot_eager)
    fi
    echo "== $tag" >&2
    # The point's own arguments first: in a smoke run the tiny sizes that follow override them.
    if ! timeout "$limit" "$python" experiments/bench.py "$@" "${size[@]}" --out "$out" --tag "$tag"; then
        echo "== $tag failed or ran out of time (limit ${limit} s)" >&2
        failed=1
    fi
}

# Time limits sum to 589 s, under the device tool's 600 s per command; the expected total is ~7 minutes.
timing=(--steps 5 --warmup 1 --repeats 3)
point train-xl2-b32 80 DiT-XL/2 32 "${timing[@]}" --kinds train --modes reference,ours,ours-bf16
point train-xl2-best 190 DiT-XL/2 128 "${timing[@]}" --kinds train --modes ours-bf16-compile --target 600
point sample-xl2 102 DiT-XL/2 64 "${timing[@]}" --kinds sample --modes reference,ours-bf16,ours-bf16-compile \
    --target 4
point train-b2 85 DiT-B/2 256 "${timing[@]}" --kinds train --modes ours-bf16,ours-bf16-compile --target 3000
point train-s2 48 DiT-S/2 256 "${timing[@]}" --kinds train --modes ours-bf16,ours-bf16-pbar
for block in adaln in_context cross_attention; do
    point "blocks-xl2-$block" 28 DiT-XL/2 32 --steps 4 --warmup 1 --repeats 3 --kinds train --modes ours-bf16 \
        --block "$block"
done

mapfile -t results < <(find "$out" -maxdepth 1 -name '*.json' -newer "$started" | sort)
if ((${#results[@]})); then
    "$python" experiments/bench.py --summarize "${results[@]}" || failed=1
else
    echo "no results were written" >&2
    failed=1
fi
exit "$failed"
