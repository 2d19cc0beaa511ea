#!/usr/bin/env bash
# The paper's DeiT-Tiny setting: bash scripts/finetune.sh tiny (set GPU_NUM, MASKED_MODEL, TEACHER_PATH, DATA_PATH).
exec bash "$(dirname "$0")/finetune.sh" tiny "$@"
