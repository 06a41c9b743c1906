#!/usr/bin/env bash
# Ablation of the small-budget design (issue 13): every lever off one at a time, and all on ("ours"), at
# 4 CPU-minutes of pretraining per run (one torch thread each, 2 runs in parallel), on flowers12 (96 px) and on
# the embedded corpus data/pets37 (64 px, 7/3 split per breed: 1/5-shot, 10-shot needs more than 7 images).
# The levers: architecture (resvit_tiny vs hybrid_tiny), lr per part (optim.transformer_lr_scale 0.3 vs one lr),
# objective (SimCLR vs fast-teacher DINO), the SimCLR head's input (pooled feature vs multi-scale embedding),
# pooling for evaluation (multiscale vs default: every run is evaluated both ways); multi-crop (4 local crops, on).
# Every run uses one lr (LR, default 3e-3 per 256: the middle of the label-efficiency grid).
#   bash benchmarks/ablation.sh                 # ~45 CPU-minutes of pretraining, ~30 minutes on 2 cores
#   ONLY=pets37 bash benchmarks/ablation.sh     # one corpus (flowers12 or pets37)
# Then: python benchmarks/ablation_table.py     # writes benchmarks/results/ablation/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
LR="${LR:-3e-3}"
METHODS="${METHODS:-ours,resvit_pooled_embed,resvit_one_lr,hybrid_tiny_simclr,resvit_cj05,resvit_multicrop,resvit_dino,resnet18_ms_embed,simclr_resnet18}"
FLOWERS="${FLOWERS:-../shared/datasets/flowers12}"
ONLY="${ONLY:-}"
case "$ONLY" in ""|flowers12|pets37) ;; *) echo "ablation: ONLY must be flowers12 or pets37, got '$ONLY'" >&2; exit 2 ;; esac
if [ "$ONLY" = pets37 ]; then
  echo "ablation: ONLY=pets37, skipping flowers12" >&2
elif [ -d "$FLOWERS/train" ]; then
  python3 benchmarks/label_efficiency.py --minutes 4 --jobs 2 --lrs "$LR" --methods "$METHODS" --data "$FLOWERS" \
    --out-dir benchmarks/results/ablation/flowers12 --work-dir runs/ablation/flowers12 "$@"
else
  echo "ablation: $FLOWERS not found, skipping flowers12" >&2
fi
[ "$ONLY" = flowers12 ] && exit 0
python3 benchmarks/label_efficiency.py --minutes 4 --jobs 2 --lrs "$LR" --methods "$METHODS" --data data/pets37 \
  --image-size 64 --shots 1,5 --out-dir benchmarks/results/ablation/pets37 --work-dir runs/ablation/pets37 "$@"
