#!/usr/bin/env bash
# SAViT one-shot pruning of DeiT-Tiny/Small/Base at the paper's FLOPs targets (0.235 / 0.30 / 0.50).
#   bash scripts/prune.sh base [more main.py flags]
# Paths come from the environment (defaults below): DEIT_CHECKPOINT (official DeiT weights,
# {'model': state_dict}), DATA_PATH (ImageFolder with train/ and val/), OUTPUT_DIR, TARGET.
set -euo pipefail
SIZE="${1:?usage: bash scripts/prune.sh tiny|small|base [main.py flags]}"
shift
source "$(dirname "$0")/paper_setting.sh"
paper_setting "$SIZE"
DEIT_CHECKPOINT="${DEIT_CHECKPOINT:-/path/to/deit_${SIZE}_patch16_224.pth}"
DATA_PATH="${DATA_PATH:-/path/to/imagenet}"
OUTPUT_DIR="${OUTPUT_DIR:-output/${SIZE}_pruning_${TARGET}}"
PYTHON="${PYTHON:-python}"

"$PYTHON" "$REPO/main.py" \
    --finetune="${DEIT_CHECKPOINT}" \
    --batch-size=32 \
    --num_workers=16 \
    --data-path="${DATA_PATH}" \
    --model="deit_${SIZE}_patch16_224" \
    --pruning_per_iteration=100 \
    --pruning_feed_percent=0.1 \
    --pruning_method=2 \
    --pruning_layers=3 \
    --pruning_flops_percentage="${TARGET}" \
    --pruning_flops_threshold=0.0001 \
    --need_hessian \
    --finetune_op=2 \
    --epochs=1 \
    --output_dir="${OUTPUT_DIR}" "$@"
