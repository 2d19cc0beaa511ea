#!/usr/bin/env bash
# The paper's DeiT-Tiny setting: bash scripts/prune.sh tiny (set DEIT_CHECKPOINT, DATA_PATH, OUTPUT_DIR).
exec bash "$(dirname "$0")/prune.sh" tiny "$@"
