"""Run folders (--output_dir) of main.py and main_deploy.py: --auto_resume, a used folder is
refused unless --overwrite or a resume flag, pickles carried over by --pruning_pickle_from, stale
temporary files of killed writers removed, and an --output_dir that is a file refused in one line.

Tiny DeiT (`deit_test_patch8_32`) on DIGITS, on the CPU. Runs call `main.main` / `main_deploy.main`
in this process (the same `cli_entry` path as the command line); the killed writer is a subprocess.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import main as prune_main
from conftest import REPO, TINY_DEPLOY, TINY_PRUNE, call_entry, launcher_free_env, one_error_line, text_logs
from models.mask import PruneMask

PICKLES = ["criteria_m2l0_final.pickle", "criteria_m2l1_final.pickle", "criteria_m2l2_final.pickle",
           "hessian.pickle"]


def _listing(folder) -> dict:
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def _epochs(folder) -> list:
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line)["epoch"] for line in f]


# ---------------------------------------------------------------------------
# main_deploy.py: --auto_resume, refusal, --overwrite
# ---------------------------------------------------------------------------

@pytest.mark.e2e  # four short runs: seconds
def test_auto_resume_starts_then_resumes_and_a_plain_run_is_refused(tmp_path, capsys):
    out = tmp_path / "ft"
    # nothing there yet: starts from epoch 0 and says so
    assert call_entry("deploy", TINY_DEPLOY + ["--epochs", "1", "--auto_resume", "--output_dir", out], capsys)[0] == 0
    text = text_logs(out)
    assert f"--auto_resume: no {out / 'checkpoint.pth'} yet; starting from epoch 0" in text
    assert "training for 1 epochs (from epoch 0)" in text
    first = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert first["epoch"] == 0 and _epochs(out) == [0]

    # the same command without a resume flag would restart at epoch 0 over it: refused, nothing touched
    before = _listing(out)
    code, err = call_entry("deploy", TINY_DEPLOY + ["--epochs", "2", "--output_dir", out], capsys)
    line = one_error_line(err)
    assert code == 2
    for words in (str(out), "checkpoint.pth", "--auto_resume", "--resume", "another --output_dir", "--overwrite"):
        assert words in line, line
    assert _listing(out) == before

    # --auto_resume now continues the run
    assert call_entry("deploy", TINY_DEPLOY + ["--epochs", "2", "--auto_resume", "--output_dir", out], capsys)[0] == 0
    text = text_logs(out)
    assert f"--auto_resume: resuming from {out / 'checkpoint.pth'}" in text
    assert "next epoch 1" in text
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["epoch"] == 1
    assert _epochs(out) == [0, 1]

    # --overwrite starts afresh: log.txt holds the new run's epochs only
    assert call_entry("deploy", TINY_DEPLOY + ["--epochs", "1", "--overwrite", "--output_dir", out], capsys)[0] == 0
    assert _epochs(out) == [0]
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["epoch"] == 0
    assert "--overwrite: removed the earlier run's" in text_logs(out)


def test_resume_stays_strict_and_auto_resume_flags_are_checked(tmp_path, capsys):
    cases = [
        (["--resume", tmp_path / "missing.pth"], ["--resume", "missing.pth", "not found"]),
        (["--auto_resume", "--resume", tmp_path / "x.pth"], ["--auto_resume", "--resume"]),
        (["--auto_resume", "--output_dir", ""], ["--auto_resume", "--output_dir"]),
    ]
    for extra, words in cases:
        argv = TINY_DEPLOY + ["--epochs", "1", "--output_dir", tmp_path / "out", *extra]
        code, err = call_entry("deploy", argv, capsys)
        line = one_error_line(err)
        assert code == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_eval_into_a_used_folder_is_not_refused(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"an earlier run")
    code, _ = call_entry("deploy", TINY_DEPLOY + ["--eval", "--output_dir", out], capsys)
    assert code == 0
    assert (out / "checkpoint.pth").read_bytes() == b"an earlier run"


# ---------------------------------------------------------------------------
# main.py: refusal, --overwrite, pickles copied from --pruning_pickle_from
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    prune_main.main(prune_main.get_args_parser().parse_args(TINY_PRUNE + ["--output_dir", str(out)]))
    return out


def test_prune_refuses_an_earlier_run_and_overwrite_replaces_it(pruned, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    for name in os.listdir(pruned):
        if not name.endswith(".log"):
            (out / name).write_bytes((pruned / name).read_bytes())
    before = _listing(out)
    code, err = call_entry("main", TINY_PRUNE + ["--output_dir", out], capsys)
    line = one_error_line(err)
    assert code == 2
    assert str(out) in line and "checkpoint_pruned_00.pth" in line and "--overwrite" in line, line
    assert _listing(out) == before

    # --overwrite from its own pickles (same folder): same mask again, the pickles left as they were
    pickles = {n: (out / n).read_bytes() for n in PICKLES}
    code, _ = call_entry("main", TINY_PRUNE + ["--output_dir", out, "--overwrite", "--pruning_pickle_from", out],
                         capsys)
    assert code == 0
    assert "--overwrite: replacing the earlier run's outputs" in text_logs(out)
    assert {n: (out / n).read_bytes() for n in PICKLES} == pickles
    assert PruneMask.load(str(out / "mask.json")) == PruneMask.load(str(pruned / "mask.json"))


def test_run_from_pickles_copies_them_so_its_folder_can_be_reused(pruned, tmp_path, capsys):
    second, third = tmp_path / "second", tmp_path / "third"
    assert call_entry("main", TINY_PRUNE + ["--pruning_pickle_from", pruned, "--output_dir", second], capsys)[0] == 0
    for name in PICKLES:
        assert (second / name).read_bytes() == (pruned / name).read_bytes(), name
    assert not [n for n in os.listdir(second) if n.startswith(".tmp_")]
    assert call_entry("main", TINY_PRUNE + ["--pruning_pickle_from", second, "--output_dir", third], capsys)[0] == 0
    assert PruneMask.load(str(third / "mask.json")) == PruneMask.load(str(pruned / "mask.json"))


# ---------------------------------------------------------------------------
# Temporary files of a writer killed mid-write
# ---------------------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from utils import atomic_write


def inner(tmp):
    with open(tmp, "wb") as f:
        f.write(b"x" * 10)
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed while writing the second file


def outer(tmp):
    with open(tmp, "wb") as f:
        f.write(b"y" * 1000)
        f.flush()
    atomic_write(os.path.join({out!r}, "mask.json"), inner)


atomic_write(os.path.join({out!r}, "checkpoint_pruned_00.pth"), outer)
"""


@pytest.mark.e2e  # subprocess runs: seconds
def test_stale_temp_files_of_a_killed_writer_are_removed_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=REPO, out=str(out))],
                          env=launcher_free_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    stale = sorted(os.listdir(out))
    assert len(stale) == 2 and all(n.startswith(".tmp_") for n in stale), stale
    # a live writer's temp file (the parent of this process is running) and look-alikes stay
    keep = {f".tmp_checkpoint.pth.{os.getppid()}.abc123.partial": b"live", "notes.txt": b"mine",
            ".tmp_notes.txt": b"mine too", "checkpoint.pth.partial": b"and this",
            ".tmp_mask.json.12x.abc.partial": b"not the pattern"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    assert call_entry("main", TINY_PRUNE + ["--output_dir", out], capsys)[0] == 0
    left = set(os.listdir(out))
    assert not set(stale) & left
    assert set(keep) <= left
    assert all((out / n).read_bytes() == data for n, data in keep.items())
    text = text_logs(out)
    match = re.search(r"removed 2 temporary file\(s\) left in (.*) by an interrupted write \((\d+) bytes\): (.*)",
                      text)
    assert match and match.group(1) == str(out) and int(match.group(2)) == 1010, text[-2000:]
    for name in stale:
        assert name in match.group(3)


# ---------------------------------------------------------------------------
# An --output_dir that is a file
# ---------------------------------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for entry, flags in (("main", TINY_PRUNE), ("deploy", TINY_DEPLOY + ["--epochs", "1"])):
        for out, words in ((a_file, "is a file"), (a_file / "sub", "lies under the file")):
            code, err = call_entry(entry, flags + ["--output_dir", out], capsys)
            line = one_error_line(err)
            assert code == 2 and "--output_dir" in line and str(out) in line and words in line, line
    assert a_file.read_text() == "not a folder"
