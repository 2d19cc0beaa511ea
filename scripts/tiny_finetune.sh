#!/usr/bin/env bash
# Fine-tune the physically pruned DeiT-Tiny (0.235 FLOPs reduction) for 300 epochs on one node,
# distilling from a RegNetY-16GF teacher as in DeiT. Resumes if a checkpoint exists.
# Edit the paths, then: bash scripts/tiny_finetune.sh
set -euo pipefail
GPU_NUM=${GPU_NUM:-8}
MASKED_MODEL=output/tiny_pruning_0.235/checkpoint_pruned_00.pth   # from scripts/tiny_pruning.sh
TEACHER_PATH=/path/to/regnety_160.pth                         # DeiT's RegNetY-16GF teacher weights
DATA_PATH=/path/to/imagenet
OUTPUT_DIR=output/tiny_finetune_0.235

CKPT="${OUTPUT_DIR}/checkpoint.pth"
if [ -e "${CKPT}" ]; then
    RESUME="--resume=${CKPT}"
else
    RESUME="--resume="
fi
torchrun --nproc_per_node="${GPU_NUM}" main_deploy.py \
    --dist-eval \
    ${RESUME} \
    --masked_model="${MASKED_MODEL}" \
    --teacher-model=regnety_160 \
    --teacher-path="${TEACHER_PATH}" \
    --distillation-type=hard \
    --batch-size=128 \
    --num_workers=16 \
    --data-path="${DATA_PATH}" \
    --model=deit_tiny_patch16_224_deploy \
    --pruning_flops_percentage=0 \
    --finetune_op=1 \
    --epochs=300 \
    --warmup-epochs=0 \
    --cooldown-epochs=0 \
    --output_dir="${OUTPUT_DIR}" "$@"
