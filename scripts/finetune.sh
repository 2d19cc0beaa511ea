#!/usr/bin/env bash
# Fine-tune a physically pruned DeiT-Tiny/Small/Base for 300 epochs on one node (total batch
# 128 x GPU_NUM), distilling from DeiT's RegNetY-16GF teacher; resumes from
# OUTPUT_DIR/checkpoint.pth when it exists (--auto_resume).
#   GPU_NUM=8 bash scripts/finetune.sh base [more main_deploy.py flags]
# Paths come from the environment (defaults below): MASKED_MODEL (main.py's checkpoint_pruned_00.pth),
# TEACHER_PATH (regnety_160 weights), DATA_PATH, OUTPUT_DIR, TARGET (names the default folders).
set -euo pipefail
SIZE="${1:?usage: bash scripts/finetune.sh tiny|small|base [main_deploy.py flags]}"
shift
source "$(dirname "$0")/paper_setting.sh"
paper_setting "$SIZE"
GPU_NUM="${GPU_NUM:-8}"
MASKED_MODEL="${MASKED_MODEL:-output/${SIZE}_pruning_${TARGET}/checkpoint_pruned_00.pth}"
TEACHER_PATH="${TEACHER_PATH:-/path/to/regnety_160.pth}"
DATA_PATH="${DATA_PATH:-/path/to/imagenet}"
OUTPUT_DIR="${OUTPUT_DIR:-output/${SIZE}_finetune_${TARGET}}"
TORCHRUN="${TORCHRUN:-torchrun}"

$TORCHRUN --nproc_per_node="${GPU_NUM}" "$REPO/main_deploy.py" \
    --dist-eval \
    --auto_resume \
    --masked_model="${MASKED_MODEL}" \
    --teacher-model=regnety_160 \
    --teacher-path="${TEACHER_PATH}" \
    --distillation-type=hard \
    --batch-size=128 \
    --num_workers=16 \
    --data-path="${DATA_PATH}" \
    --model="deit_${SIZE}_patch16_224_deploy" \
    --pruning_flops_percentage=0 \
    --finetune_op=1 \
    --epochs=300 \
    --warmup-epochs=0 \
    --cooldown-epochs=0 \
    --output_dir="${OUTPUT_DIR}" "$@"
