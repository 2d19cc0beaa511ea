#!/usr/bin/env bash
# The paper's DeiT-Small setting: bash scripts/finetune.sh small (set GPU_NUM, MASKED_MODEL, TEACHER_PATH, DATA_PATH).
exec bash "$(dirname "$0")/finetune.sh" small "$@"
