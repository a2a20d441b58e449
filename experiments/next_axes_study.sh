#!/usr/bin/env bash
# Issue 21's CPU evidence, after the cpu_next_axes sweep (conf/experiment/cpu_next_axes.yaml):
#   python src/train.py -m experiment=cpu_next_axes hydra.sweep.dir=<sweep>
#   bash experiments/next_axes_study.sh <sweep>
# then writes experiments/results/cpu_next_axes/:
# - each run's results.json and grid, as <design point>-seed<seed>/ (what test_presets checks against the preset);
# - post-hoc EMA: FID against σ_rel of the two sit_linear runs, reconstructed from their snapshots, beside their
#   classic EMA (EMA 0.995) scored the same way (the run's protocol: Euler 50, FID-500, sampling seed 0; bf16
#   autocast as in training), the samples kept for the class scores: posthoc_ema/<run>/;
# - MeanFlow's one- and two-step FID-500 by fid_nfe.py (sampling seed 0): meanflow_steps/<run>/, and 500
#   unguided two-step samples by sample.py for their class scores;
# - the class scores of every set of samples: class_scores.json, class_scores_posthoc_ema.json,
#   class_scores_meanflow_2steps.json;
# - the sweep's report: report/.
# About 25 minutes on a 2-core Xeon after the sweep (~90 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${1:?usage: bash experiments/next_axes_study.sh <the cpu_next_axes sweep folder>}
OUT=experiments/results/cpu_next_axes
PY=${PY:-.venv/bin/python}
export WANDB_MODE=disabled
mkdir -p "$OUT"
for run in "$SWEEP"/*_*/; do  # <design point>-seed<seed>: results.json and the grid of each finished job
  name=$($PY -c 'import json, sys
outcome = json.load(open(sys.argv[1]))
kv = dict(x.lstrip("+").split("=", 1) for x in outcome["overrides"] if "=" in x)
print(kv["design_point"] + "-seed" + kv["seed"] if outcome["status"] == "done" else "")' "$run/outcome.json")
  if [ -z "$name" ]; then echo "skipped $run: its job did not finish (outcome.json)"; continue; fi
  mkdir -p "$OUT/$name" && cp "$run/results.json" "$OUT/$name/" && cp "$run/samples/final.png" "$OUT/$name/grid.png"
done
for run in "$SWEEP"/*_adaln_zero-DiT-Ti-p4+sit_linear; do  # checkpoints and samples into <run>/checkpoints
  $PY src/posthoc_ema.py run="$run" 'sigma_rel=[0.02,0.05,0.1,0.15,0.2,0.25]' fid=true precision=bf16 save_samples=true
  mkdir -p "$OUT/posthoc_ema/$(basename "$run")"
  cp "$run"/checkpoints/posthoc_ema_fid.* "$run"/checkpoints/fid_vs_sigma_rel.png "$OUT/posthoc_ema/$(basename "$run")/" || true
done
for run in "$SWEEP"/*_adaln_zero-DiT-Ti-p4+meanflow*; do
  $PY src/fid_nfe.py ckpt="$run/checkpoints/last.ckpt" 'samplers=[meanflow]' 'steps=[1,2]' num_samples=500 \
    'seeds=[0]' precision=bf16 out="$OUT/meanflow_steps/$(basename "$run")"
done
for run in "$SWEEP"/*_adaln_zero-DiT-Ti-p4+meanflow*; do  # 500 unguided 2-step samples for the class scores
  $PY src/sample.py ckpt="$run/checkpoints/last.ckpt" steps=2 num_samples=500 cfg_scale=1 precision=bf16 png=false \
    progress=false out="$run/samples/meanflow_2steps"
done
$PY experiments/class_accuracy.py --samples "$SWEEP"/*/samples/fid_step*.npz --json "$OUT/class_scores.json"
$PY experiments/class_accuracy.py --samples "$SWEEP"/*/samples/meanflow_2steps.npz \
  --json "$OUT/class_scores_meanflow_2steps.json"
$PY experiments/class_accuracy.py --samples "$SWEEP"/*_adaln_zero-DiT-Ti-p4+sit_linear/checkpoints/samples/*.npz \
  --json "$OUT/class_scores_posthoc_ema.json"
$PY src/report.py runs="$OUT" out="$OUT/report"
