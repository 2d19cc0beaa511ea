#!/usr/bin/env bash
# SAViT one-shot pruning of DeiT-Tiny to 0.235 FLOPs reduction (the paper's target).
# Edit the paths, then: bash scripts/tiny_pruning.sh
set -euo pipefail
DEIT_CHECKPOINT=/path/to/deit_tiny_patch16_224.pth   # official DeiT weights ({'model': state_dict})
DATA_PATH=/path/to/imagenet          # ImageFolder tree with train/ and val/
OUTPUT_DIR=output/tiny_pruning_0.235

python main.py \
    --finetune="${DEIT_CHECKPOINT}" \
    --batch-size=32 \
    --num_workers=16 \
    --data-path="${DATA_PATH}" \
    --model=deit_tiny_patch16_224 \
    --pruning_per_iteration=100 \
    --pruning_feed_percent=0.1 \
    --pruning_method=2 \
    --pruning_layers=3 \
    --pruning_flops_percentage=0.235 \
    --pruning_flops_threshold=0.0001 \
    --need_hessian \
    --finetune_op=2 \
    --epochs=1 \
    --output_dir="${OUTPUT_DIR}" "$@"
