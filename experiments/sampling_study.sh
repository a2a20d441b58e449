#!/usr/bin/env bash
# Issue 22's CPU evidence, rerun as committed: FID against network evaluations (NFE) for the CPU demo's DDPM
# and sit_linear checkpoints, and autoguidance against CFG. Trains the three runs it needs (the demo with
# checkpoints every 500 steps, the demo at patch 8, the sit_linear demo) into $RUNS unless they are there,
# then writes experiments/results/sampling/.
# About 30 minutes on a 2-core Xeon for the DDPM sweep and the first two autoguidance studies, after the
# trainings (~10, ~5 and ~10 minutes); then the sit_linear sweep (18 min) and the guide-weight study (13 min).
#   bash experiments/sampling_study.sh [RUNS=/tmp/ditlab_sampling_runs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-/tmp/ditlab_sampling_runs}
OUT=experiments/results/sampling
PY=${PY:-.venv/bin/python}
export WANDB_MODE=disabled
train() {  # name, overrides...
  local name=$1; shift
  [ -f "$RUNS/$name/checkpoints/last.ckpt" ] || $PY src/train.py optim.max_time=null hydra.run.dir="$RUNS/$name" "$@"
}
train demo_ddpm callbacks.checkpointing.every_n_steps=500 callbacks.checkpointing.keep_last=6
train demo_p8 patch=8
train demo_sit diffusion=sit_linear callbacks.checkpointing.every_n_steps=500 callbacks.checkpointing.keep_last=6
$PY src/fid_nfe.py ckpt="$RUNS/demo_ddpm/checkpoints/last.ckpt" 'samplers=[ddim,dpmsolver++,unipc]' \
  'steps=[5,10,25,50]' num_samples=500 'seeds=[0,1]' out="$OUT/fid_nfe_ddpm"
$PY experiments/autoguidance_study.py --ckpt "$RUNS/demo_ddpm/checkpoints/last.ckpt" \
  --guide step500="$RUNS/demo_ddpm/checkpoints/step_0000500.ckpt" \
  --guide ti8="$RUNS/demo_p8/checkpoints/last.ckpt" \
  --sampler dpmsolver++ --steps 10 --cfg-scales 1 1.5 2.5 --guide-scales 2 --seeds 0 1 --num-samples 500 --out "$OUT/autoguidance"
# CFG at 4 (the demo grids' scale): whether CFG's best FID lies beyond 2.5
$PY experiments/autoguidance_study.py --ckpt "$RUNS/demo_ddpm/checkpoints/last.ckpt" \
  --sampler dpmsolver++ --steps 10 --cfg-scales 4 --seeds 0 1 --num-samples 500 --out "$OUT/autoguidance_cfg4"
# The interpolant's samplers on the sit_linear demo (dopri5 is adaptive: one point, its NFE as it took them)
$PY src/fid_nfe.py ckpt="$RUNS/demo_sit/checkpoints/last.ckpt" 'samplers=[euler,heun,dopri5]' \
  'steps=[5,10,25,50]' num_samples=500 'seeds=[0,1]' out="$OUT/fid_nfe_sit"
# Autoguidance by the step-1000 checkpoint, and the guide weight w for both earlier checkpoints
$PY experiments/autoguidance_study.py --ckpt "$RUNS/demo_ddpm/checkpoints/last.ckpt" \
  --guide step500="$RUNS/demo_ddpm/checkpoints/step_0000500.ckpt" \
  --guide step1000="$RUNS/demo_ddpm/checkpoints/step_0001000.ckpt" \
  --sampler dpmsolver++ --steps 10 --cfg-scales 1 --guide-scales 1.5 2 3 --seeds 0 1 --num-samples 500 \
  --out "$OUT/autoguidance_w"
for run in demo_ddpm demo_p8 demo_sit; do
  mkdir -p "$OUT/runs/$run" && cp "$RUNS/$run/results.json" "$OUT/runs/$run/"
done
