"""Bad input is one `error:` line naming the flag or file, also in the run's log: unreadable
images (with and without loader workers), a worker's error carried back, --input-size and
percentage ranges, and under torchrun the line from rank 0 only.

Tiny DeiT (`deit_test_patch8_32`) on small ImageFolder trees made here or DIGITS, on the CPU;
`main.main` / `main_deploy.main` run in this process, torchrun in a subprocess.
"""
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import utils
from conftest import (NO_AUGMENT, REPO, TINY_DEPLOY, TINY_PRUNE, call_entry, launcher_free_env, one_error_line,
                      text_logs)


# ---------------------------------------------------------------------------
# Unreadable images: one line naming the file and the set, in the log too
# ---------------------------------------------------------------------------

def _image_tree(root, bad_split: str, kind: str) -> str:
    """train/ and val/ with classes a, b of 4 random 32x32 PNGs each; one bad file in `bad_split`/a."""
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = root / bad_split / "a" / "2.png"  # replaces a good image, so it is in the first batch
    if kind == "corrupt":
        bad.write_bytes(b"this is not a PNG file at all")
    else:
        bad.write_bytes(bad.read_bytes()[:600])  # a truncated PNG: its header reads, its pixels do not
    return str(bad)


IMAGES = ["--data-set", "IMNET", "--input-size", "32", "--device", "cpu", *NO_AUGMENT, "--batch-size", "8"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_training_image_while_pruning(tmp_path, num_workers, capfd, quick_worker_exit):
    bad = _image_tree(tmp_path / "data", "train", "corrupt")
    out = tmp_path / "out"
    code, err = call_entry("main", ["--model", "deit_test_patch8_32", *IMAGES, "--data-path", tmp_path / "data",
                                    "--finetune_op", "2", "--pruning_feed_percent", "1",
                                    "--num_workers", num_workers, "--output_dir", out], capfd)
    line = one_error_line(err)
    assert code == 2
    assert line.startswith(f"error: --data-path: cannot read image {bad!r}"), line  # with or without workers
    assert "training set while pruning" in line, line
    assert line in text_logs(out)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_validation_image(tmp_path, num_workers, capfd, quick_worker_exit):
    bad = _image_tree(tmp_path / "data", "val", "truncated")
    out = tmp_path / "out"
    code, err = call_entry("deploy", ["--model", "deit_test_patch8_32_deploy", *IMAGES, "--data-path", tmp_path / "data",
                                      "--eval", "--num_workers", num_workers, "--output_dir", out], capfd)
    line = one_error_line(err)
    assert code == 2
    assert line.startswith(f"error: --data-path: cannot read image {bad!r}"), line  # with or without workers
    assert "validation set" in line and "truncated" in line, line
    assert line in text_logs(out)


def test_worker_wrapped_user_error_comes_back_as_its_own_line():
    traceback = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                 "  File \"x.py\", line 1, in f\nutils.errors.UserError: bad image, see --data-set")
    flags = {"data_path": "--data-path", "data_set": "--data-set"}
    assert utils.error_line(utils.UserError(traceback), flags) == "bad image, see --data-set"
    with_field = utils.UserError(f"{traceback}\n{utils.errors.FIELD_NOTE}data_path")  # the note of a field
    assert utils.error_line(with_field, flags) == "--data-path: bad image, see --data-set"
    assert utils.error_line(utils.UserError("plain")) == "plain"


# ---------------------------------------------------------------------------
# Flags: --input-size, percentages
# ---------------------------------------------------------------------------

def test_input_size_and_percentage_errors_name_the_flag_and_one_range(tmp_path, capsys):
    code, err = call_entry("main", TINY_PRUNE + ["--input-size", "31", "--output_dir", tmp_path / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--input-size 31" in line and "patch size 8" in line, line
    code, err = call_entry("deploy", TINY_DEPLOY + ["--input-size", "31", "--output_dir", tmp_path / "o"], capsys)
    assert "--input-size 31" in one_error_line(err)
    # --pruning_flops_percentage 0 and 1 in main.py: the same range in both messages
    ranges = set()
    for value in ("0", "1", "-0.5"):
        argv = TINY_PRUNE + ["--pruning_flops_percentage", value, "--output_dir", tmp_path / "o"]
        code, err = call_entry("main", argv, capsys)
        line = one_error_line(err)
        ranges.add(re.search(r"must be in (\S+, \S+)", line).group(1))
    assert ranges == {"(0, 1)"}
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# torchrun: one error line, from rank 0
# ---------------------------------------------------------------------------

def _raise(err):
    raise err


def test_cli_entry_prints_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the other ranks' wait for rank 0 to print
    failing = utils.cli_entry(_raise)
    for rank, specific, expected in (("0", False, "error: same everywhere\n"), ("1", False, ""),
                                     ("1", True, "error (rank 1): same everywhere\n")):
        monkeypatch.setenv("RANK", rank)
        err = utils.UserError("same everywhere")
        err.rank_specific = specific
        with pytest.raises(SystemExit) as exit_:
            failing(err)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == expected


@pytest.mark.e2e
def test_torchrun_user_error_printed_once(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "main_deploy.py", *TINY_DEPLOY, "--epochs", "1", "--output_dir", str(a_file)],
                          cwd=REPO, env=launcher_free_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert len(ours) == 1 and "--output_dir" in ours[0], proc.stdout[-2000:] + proc.stderr[-2000:]
