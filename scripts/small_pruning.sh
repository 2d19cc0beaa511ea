#!/usr/bin/env bash
# The paper's DeiT-Small setting: bash scripts/prune.sh small (set DEIT_CHECKPOINT, DATA_PATH, OUTPUT_DIR).
exec bash "$(dirname "$0")/prune.sh" small "$@"
