"""Runs that can be trusted (issue 8): --auto_resume, runs that never clobber each other, stale
temporary files of killed writers, pickles carried over by --pruning_pickle_from, and bad input
(unreadable images, an --output_dir that is a file, pruning.flops flags, torchrun ranks) as one
`error:` line that is also logged.

Tiny DeiT (`deit_test_patch8_32`) on DIGITS or on small ImageFolder trees made here, on the CPU.
Most runs call `main.main` / `main_deploy.main` in this process (the same `cli_entry` path as the
command line); a few run as subprocesses where the process itself matters (exit status, a killed
writer, torchrun).
"""
import glob
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main as prune_main
import main_deploy
import utils
from pruning import flops
from models.mask import PruneMask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu", "--num_workers", "0"]
PLAIN = ["--aa=", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--log_period", "100"]  # no randomness to spare
DEPLOY = ["--model", "deit_test_patch8_32_deploy", *DATA, *PLAIN, "--batch-size", "100", "--warmup-epochs", "0"]
PRUNE = ["--model", "deit_test_patch8_32", *DATA, *PLAIN, "--batch-size", "16", "--pruning_feed_percent", "0.06",
         "--need_hessian", "--finetune_op", "2", "--pruning_flops_percentage", "0.5"]
PICKLES = ["criteria_m2l0_final.pickle", "criteria_m2l1_final.pickle", "criteria_m2l2_final.pickle",
           "hessian.pickle"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(argv, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _call(entry, argv, capsys) -> tuple:
    """(exit status, stderr) of an entry point called in this process."""
    module = prune_main if entry == "main" else main_deploy
    code = 0
    try:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def _text_logs(folder) -> str:
    names = sorted(glob.glob(os.path.join(str(folder), "*.log")))
    return "".join(open(n).read() for n in names)


def _listing(folder) -> dict:
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def _epochs(folder) -> list:
    import json

    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line)["epoch"] for line in f]


# ---------------------------------------------------------------------------
# main_deploy.py: --auto_resume, refusal, --overwrite
# ---------------------------------------------------------------------------

@pytest.mark.e2e  # subprocess runs: seconds
def test_auto_resume_starts_then_resumes_and_a_plain_run_is_refused(tmp_path, capsys):
    out = tmp_path / "ft"
    # nothing there yet: starts from epoch 0 and says so
    assert _call("deploy", DEPLOY + ["--epochs", "1", "--auto_resume", "--output_dir", out], capsys)[0] == 0
    text = _text_logs(out)
    assert f"--auto_resume: no {out / 'checkpoint.pth'} yet; starting from epoch 0" in text
    assert "training for 1 epochs (from epoch 0)" in text
    first = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert first["epoch"] == 0 and _epochs(out) == [0]

    # the same command without a resume flag would restart at epoch 0 over it: refused, nothing touched
    before = _listing(out)
    code, err = _call("deploy", DEPLOY + ["--epochs", "2", "--output_dir", out], capsys)
    line = _one_error_line(err)
    assert code == 2
    for words in (str(out), "checkpoint.pth", "--auto_resume", "--resume", "another --output_dir", "--overwrite"):
        assert words in line, line
    assert _listing(out) == before

    # --auto_resume now continues the run
    assert _call("deploy", DEPLOY + ["--epochs", "2", "--auto_resume", "--output_dir", out], capsys)[0] == 0
    text = _text_logs(out)
    assert f"--auto_resume: resuming from {out / 'checkpoint.pth'}" in text
    assert "next epoch 1" in text
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["epoch"] == 1
    assert _epochs(out) == [0, 1]

    # --overwrite starts afresh: log.txt holds the new run's epochs only
    assert _call("deploy", DEPLOY + ["--epochs", "1", "--overwrite", "--output_dir", out], capsys)[0] == 0
    assert _epochs(out) == [0]
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["epoch"] == 0
    assert "--overwrite: removed the earlier run's" in _text_logs(out)


def test_resume_stays_strict_and_auto_resume_flags_are_checked(tmp_path, capsys):
    cases = [
        (["--resume", tmp_path / "missing.pth"], ["--resume", "missing.pth", "not found"]),
        (["--auto_resume", "--resume", tmp_path / "x.pth"], ["--auto_resume", "--resume"]),
        (["--auto_resume", "--output_dir", ""], ["--auto_resume", "--output_dir"]),
    ]
    for extra, words in cases:
        code, err = _call("deploy", DEPLOY + ["--epochs", "1", "--output_dir", tmp_path / "out", *extra], capsys)
        line = _one_error_line(err)
        assert code == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_eval_into_a_used_folder_is_not_refused(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"an earlier run")
    code, _ = _call("deploy", DEPLOY + ["--eval", "--output_dir", out], capsys)
    assert code == 0
    assert (out / "checkpoint.pth").read_bytes() == b"an earlier run"


# ---------------------------------------------------------------------------
# main.py: refusal, --overwrite, pickles copied from --pruning_pickle_from
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    prune_main.main(prune_main.get_args_parser().parse_args(PRUNE + ["--output_dir", str(out)]))
    return out


def test_prune_refuses_an_earlier_run_and_overwrite_replaces_it(pruned, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    for name in os.listdir(pruned):
        if not name.endswith(".log"):
            (out / name).write_bytes((pruned / name).read_bytes())
    before = _listing(out)
    code, err = _call("main", PRUNE + ["--output_dir", out], capsys)
    line = _one_error_line(err)
    assert code == 2
    assert str(out) in line and "checkpoint_pruned_00.pth" in line and "--overwrite" in line, line
    assert _listing(out) == before

    # --overwrite from its own pickles (same folder): same mask again, the pickles left as they were
    pickles = {n: (out / n).read_bytes() for n in PICKLES}
    code, _ = _call("main", PRUNE + ["--output_dir", out, "--overwrite", "--pruning_pickle_from", out], capsys)
    assert code == 0
    assert "--overwrite: replacing the earlier run's outputs" in _text_logs(out)
    assert {n: (out / n).read_bytes() for n in PICKLES} == pickles
    assert PruneMask.load(str(out / "mask.json")) == PruneMask.load(str(pruned / "mask.json"))


def test_run_from_pickles_copies_them_so_its_folder_can_be_reused(pruned, tmp_path, capsys):
    second, third = tmp_path / "second", tmp_path / "third"
    assert _call("main", PRUNE + ["--pruning_pickle_from", pruned, "--output_dir", second], capsys)[0] == 0
    for name in PICKLES:
        assert (second / name).read_bytes() == (pruned / name).read_bytes(), name
    assert not [n for n in os.listdir(second) if n.startswith(".tmp_")]
    assert _call("main", PRUNE + ["--pruning_pickle_from", second, "--output_dir", third], capsys)[0] == 0
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
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=REPO, out=str(out))], env=_env(),
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    stale = sorted(os.listdir(out))
    assert len(stale) == 2 and all(n.startswith(".tmp_") for n in stale), stale
    # a live writer's temp file (the parent of this process is running) and look-alikes stay
    keep = {f".tmp_checkpoint.pth.{os.getppid()}.abc123.partial": b"live", "notes.txt": b"mine",
            ".tmp_notes.txt": b"mine too", "checkpoint.pth.partial": b"and this",
            ".tmp_mask.json.12x.abc.partial": b"not the pattern"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    assert _call("main", PRUNE + ["--output_dir", out], capsys)[0] == 0
    left = set(os.listdir(out))
    assert not set(stale) & left
    assert set(keep) <= left
    assert all((out / n).read_bytes() == data for n, data in keep.items())
    text = _text_logs(out)
    match = re.search(r"removed 2 temporary file\(s\) left in (.*) by an interrupted write \((\d+) bytes\): (.*)",
                      text)
    assert match and match.group(1) == str(out) and int(match.group(2)) == 1010, text[-2000:]
    for name in stale:
        assert name in match.group(3)


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


IMAGES = ["--data-set", "IMNET", "--input-size", "32", "--device", "cpu", *PLAIN, "--batch-size", "8"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_training_image_while_pruning(tmp_path, num_workers, capfd):
    bad = _image_tree(tmp_path / "data", "train", "corrupt")
    out = tmp_path / "out"
    code = 0
    try:
        prune_main.main(prune_main.get_args_parser().parse_args(
            ["--model", "deit_test_patch8_32", *IMAGES, "--data-path", str(tmp_path / "data"), "--finetune_op", "2",
             "--pruning_feed_percent", "1", "--num_workers", str(num_workers), "--output_dir", str(out)]))
    except SystemExit as exit_:
        code = exit_.code
    line = _one_error_line(capfd.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: --data-path: cannot read image {bad!r}"), line  # with or without workers
    assert "training set while pruning" in line, line
    assert line in _text_logs(out)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_validation_image(tmp_path, num_workers, capfd):
    bad = _image_tree(tmp_path / "data", "val", "truncated")
    out = tmp_path / "out"
    code = 0
    try:
        main_deploy.main(main_deploy.get_args_parser().parse_args(
            ["--model", "deit_test_patch8_32_deploy", *IMAGES, "--data-path", str(tmp_path / "data"), "--eval",
             "--num_workers", str(num_workers), "--output_dir", str(out)]))
    except SystemExit as exit_:
        code = exit_.code
    line = _one_error_line(capfd.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: --data-path: cannot read image {bad!r}"), line  # with or without workers
    assert "validation set" in line and "truncated" in line, line
    assert line in _text_logs(out)


def test_worker_wrapped_user_error_comes_back_as_its_own_line():
    traceback = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                 "  File \"x.py\", line 1, in f\nutils.errors.UserError: bad image, see --data-set")
    flags = {"data_path": "--data-path", "data_set": "--data-set"}
    assert utils.error_line(utils.UserError(traceback), flags) == "bad image, see --data-set"
    with_field = utils.UserError(f"{traceback}\n{utils.errors.FIELD_NOTE}data_path")  # the note of a field
    assert utils.error_line(with_field, flags) == "--data-path: bad image, see --data-set"
    assert utils.error_line(utils.UserError("plain")) == "plain"


# ---------------------------------------------------------------------------
# Flags: --output_dir that is a file, --input-size, percentages, pruning.flops
# ---------------------------------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for entry, flags in (("main", PRUNE), ("deploy", DEPLOY + ["--epochs", "1"])):
        for out, words in ((a_file, "is a file"), (a_file / "sub", "lies under the file")):
            code, err = _call(entry, flags + ["--output_dir", out], capsys)
            line = _one_error_line(err)
            assert code == 2 and "--output_dir" in line and str(out) in line and words in line, line
    assert a_file.read_text() == "not a folder"


def test_input_size_and_percentage_errors_name_the_flag_and_one_range(tmp_path, capsys):
    code, err = _call("main", PRUNE + ["--input-size", "31", "--output_dir", tmp_path / "o"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "--input-size 31" in line and "patch size 8" in line, line
    code, err = _call("deploy", DEPLOY + ["--input-size", "31", "--output_dir", tmp_path / "o"], capsys)
    assert "--input-size 31" in _one_error_line(err)
    # --pruning_flops_percentage 0 and 1 in main.py: the same range in both messages
    ranges = set()
    for value in ("0", "1", "-0.5"):
        code, err = _call("main", PRUNE + ["--pruning_flops_percentage", value, "--output_dir", tmp_path / "o"],
                          capsys)
        line = _one_error_line(err)
        ranges.add(re.search(r"must be in (\S+, \S+)", line).group(1))
    assert ranges == {"(0, 1)"}
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, words", [
    (["--input-size", "0"], ["--input-size", "got 0"]),
    (["--model", "deit_test_patch8_32", "--input-size", "31"], ["--input-size", "patch size 8", "got 31"]),
    (["--nb-classes", "0"], ["--nb-classes", "got 0"]),
    (["--mask", "/nowhere/mask.json"], ["--mask", "/nowhere/mask.json", "not found"]),
])
def test_flops_cli_flags(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        utils.cli_entry(flops._main)(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert exit_.value.code == 2 and all(w in line for w in words), line


@pytest.mark.e2e  # subprocess runs: seconds
def test_flops_cli_input_size_zero_on_the_command_line():
    proc = _run(["-m", "pruning.flops", "--input-size", "0"], timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr).startswith("error: --input-size")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# torchrun: one error line, from rank 0
# ---------------------------------------------------------------------------

def _raise(err):
    raise err


def test_cli_entry_prints_on_rank_0_only(monkeypatch, capsys):
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
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "main_deploy.py",
                 *DEPLOY, "--epochs", "1", "--output_dir", str(a_file)], timeout=180)
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert len(ours) == 1 and "--output_dir" in ours[0], proc.stdout[-2000:] + proc.stderr[-2000:]
