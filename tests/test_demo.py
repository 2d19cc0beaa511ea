"""The README's main command, shortened: scripts/demo.sh end to end on the digits data."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHON=sys.executable, PRETRAIN_EPOCHS="2", FINETUNE_EPOCHS="1", FEED_PERCENT="0.05",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| | unpruned"):]
    # the summary reports three accuracies, the halved FLOPs and the measured speed
    accs = re.findall(r"([\d.]+)%", table.splitlines()[2])
    assert len(accs) == 3 and all(0 <= float(a) <= 100 for a in accs)
    reduction = float(re.search(r"\(([\d.]+)% fewer\)", table).group(1))
    assert abs(reduction - 50.0) <= 0.5
    assert "img/s" in table
    for path in ("1_pretrain/best_checkpoint.pth", "1_pretrain/log.txt", "1_pretrain/tensorboard",
                 "2_prune/checkpoint_pruned_00.pth", "2_prune/mask.json", "2_prune/hessian.pickle",
                 "3_finetune/checkpoint.pth", "3_finetune/log.txt", "summary.md"):
        assert (out / path).exists(), path
