#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA-only tests, DeiT-B pruning pass, torchrun AMP
# fine-tuning runs of main_deploy.py (hard distillation; the distilled student without a teacher and
# with hard distillation; two nccl ranks when two GPUs are visible), and deploy speed; a markdown table.
#   bash scripts/gpu_check.sh [--out FILE] [--tiny] [--device cpu]
# The whole run is capped at 8 minutes (timeout 480; the check itself keeps to 450 s). With CUDA
# it writes logs/gpu_check.md; without, it runs the tiny check into output/gpu_check/gpu_check.md.
# Exit status: non-zero when a step failed (124 when the timeout cut the run).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONUNBUFFERED=1
export GPU_CHECK_LAUNCHER="bash scripts/gpu_check.sh"
exec timeout --kill-after=15 480 "${PYTHON:-python}" "$REPO/benchmarks/gpu_check.py" "$@"
