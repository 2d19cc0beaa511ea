"""benchmarks/ablation.py: bad flags give one line (its `main`, in this process), and an ImageFolder
runs end to end from the command line."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from benchmarks import ablation
from test_datasets import make_image_folder
from test_readme_commands import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ablation.py")


def _run(args, cwd, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flags, named", [
    (["--data-path", "/no/such/folder"], "--data-path"),
    (["--targets", "0.5", "1.2"], "--targets"),
    (["--data-set", "CIFAR"], "--data-set"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # main() as the command line calls it, in this process
        ablation.main(ablation.parse_args([*flags, "--output_dir", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], lines
    assert not os.path.exists(tmp_path / "out" / "pretrain")  # refused before any work


@pytest.mark.e2e
def test_runs_on_an_image_folder(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8, size=(36, 36))
    out = tmp_path / "out"
    # the README's command, its flags overridden by the ones after them (argparse keeps the last)
    _, script, *readme_flags = shlex.split(readme_command("ablation"))
    assert os.path.join(ROOT, script) == SCRIPT
    proc = _run([*readme_flags, "--data-path", str(data), "--model", "deit_test_patch8_32", "--input-size", "32",
                 "--batch-size", "8", "--targets", "0.5", "--seeds", "0", "--methods", "savit", "random",
                 "--pretrain_epochs", "1", "--finetune_epochs", "1", "--feed_percent", "1.0",
                 "--output_dir", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)["results"]["0.5"]
    assert set(results) == {"savit", "random"}
    for rows in results.values():
        assert len(rows) == 1 and 0 <= rows[0]["acc_pruned"] <= 100 and 0.49 < rows[0]["reduction"] < 0.51
    assert results["random"][0]["counts"] == results["savit"][0]["counts"]  # random takes SAViT's counts
    table = (out / "ablation.md").read_text()
    assert f"the ImageFolder `{data}`" in table and "of 3 classes" in table
    # the data flags reached main.py: it pruned on the ImageFolder, not the digits
    with open(out / "target0.5" / "seed0" / "savit" / "run.out") as f:
        assert "IMNET" in f.read()
