#!/usr/bin/env bash
# The paper's DeiT-Base setting: bash scripts/prune.sh base (set DEIT_CHECKPOINT, DATA_PATH, OUTPUT_DIR).
exec bash "$(dirname "$0")/prune.sh" base "$@"
