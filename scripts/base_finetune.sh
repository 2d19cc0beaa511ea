#!/usr/bin/env bash
# The paper's DeiT-Base setting: bash scripts/finetune.sh base (set GPU_NUM, MASKED_MODEL, TEACHER_PATH, DATA_PATH).
exec bash "$(dirname "$0")/finetune.sh" base "$@"
