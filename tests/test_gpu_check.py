"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py): its CPU version end to end, the
discovery of the CUDA-only tests, the defaults that keep a CPU run off the committed GPU table,
and that one step's failure or hang neither stops the others nor goes unreported."""
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from benchmarks import common, gpu_check
from test_readme_commands import readme_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table_rows(text: str) -> dict:
    """{step title: status} from the results table of the markdown."""
    rows = re.findall(r"^\| (\d) \| ([^|]+) \| ([^|]+) \|", text, flags=re.M)
    return {title.strip(): status.strip() for _, title, status in rows}


def test_cuda_test_ids_are_the_tests_that_skip_without_cuda():
    # independent reading: every `def test_...` decorated by a skip with the reason "needs CUDA"
    expected = set()
    for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(REPO, "tests", name)) as f:
                text = f.read()
            for m in re.finditer(r'reason="needs CUDA"\)\n(?:@.*\n)*def (test_\w+)', text):
                expected.add(f"tests/{name}::{m.group(1)}")
    ids = gpu_check.cuda_test_ids()
    assert set(ids) == expected and len(ids) == len(expected)
    assert "tests/test_engine.py::test_cuda_amp_epoch_with_scaler_and_memory_in_progress" in ids


def test_cpu_defaults_are_tiny_and_never_the_committed_gpu_table():
    args = gpu_check.parse_args(["--device", "cpu"])
    assert args.tiny and args.budget == 0
    assert args.out == os.path.join(REPO, "output", "gpu_check", "gpu_check.md")
    assert gpu_check.settings(True)["model"] == "deit_test_patch8_32"
    full = gpu_check.settings(False)
    assert (full["model"], full["prune_batch"], full["speed_batches"]) == ("deit_base_patch16_224", 32, (256, 1))
    assert os.path.isfile(full["mask"])
    assert sum(full["budgets"].values()) <= gpu_check.TOTAL_BUDGET_S < 480  # inside the script's timeout


def test_bad_device_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "tpu"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --device")


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    ran = []

    def passing(name):
        def step(args, cfg, timeout):
            ran.append(name)
            return {"status": "passed", "summary": f"{name} ok", "details": [f"detail of {name}"]}
        return step

    def raising(args, cfg, timeout):
        ran.append("pruning_pass")
        raise RuntimeError("out of memory | here")

    steps = {name: passing(name) for name in gpu_check.STEPS}
    steps["pruning_pass"] = raising
    monkeypatch.setattr(gpu_check, "make_steps", lambda: steps)
    out = tmp_path / "check.md"
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cpu", "--out", str(out)])
    assert exc.value.code == 1
    assert ran == list(gpu_check.STEPS)
    text = out.read_text()
    rows = table_rows(text)
    assert list(rows) == [gpu_check.TITLES[s] for s in gpu_check.STEPS]
    assert rows[gpu_check.TITLES["pruning_pass"]].startswith("failed: RuntimeError: out of memory")
    assert all(rows[gpu_check.TITLES[s]] == "passed" for s in gpu_check.STEPS if s != "pruning_pass")
    assert "detail of deploy_speed" in text


def test_a_spent_budget_fails_the_remaining_steps(tmp_path, monkeypatch):
    def slow(args, cfg, timeout):
        time.sleep(0.3)
        return {"status": "passed", "summary": ""}

    monkeypatch.setattr(gpu_check, "make_steps", lambda: dict.fromkeys(gpu_check.STEPS, slow))
    out = tmp_path / "check.md"
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--budget", "5", "--out", str(out)])
    statuses = list(table_rows(out.read_text()).values())
    # under 10 s left: nothing starts
    assert statuses == ["failed: not run, the check's 5 s budget was spent"] * len(gpu_check.STEPS)


def test_two_ranks_are_skipped_with_one_visible_gpu(monkeypatch):
    import argparse

    step, full = gpu_check.deploy_step("two_ranks"), gpu_check.settings(False)
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "deploy_run", lambda *a, **k: pytest.fail("no run with one GPU"))
    result = step(argparse.Namespace(device="cuda"), full, 60)
    assert result["status"] == "skipped: 1 GPU visible (two ranks need two)"
    calls = []
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(gpu_check, "deploy_run", lambda args, cfg, timeout, run: calls.append(run) or
                        {"problems": [], "summary": "ok", "details": []})
    assert step(argparse.Namespace(device="cuda"), full, 60)["status"] == "passed"
    assert [(run.nproc, full[run.student], full[run.steps]) for run in calls] == [(2, "deit_base_patch16_224", 3)]


def test_the_distilled_student_runs_without_then_with_a_teacher_in_one_budget(monkeypatch):
    import argparse

    calls = []
    monkeypatch.setattr(gpu_check, "deploy_run", lambda args, cfg, timeout, run: calls.append((run, timeout)) or
                        {"problems": ["bad"] if run.distillation == "none" else [], "summary": run.distillation,
                         "details": []})
    tiny = gpu_check.settings(True)
    result = gpu_check.deploy_step("distilled_student")(argparse.Namespace(device="cpu"), tiny, 100)
    assert [(tiny[run.student], run.distillation, run.nproc) for run, _ in calls] == [
        ("deit_test_distilled_patch8_32", "none", 1), ("deit_test_distilled_patch8_32", "hard", 1)]
    assert calls[0][1] == pytest.approx(50, abs=1) and calls[1][1] == pytest.approx(100, abs=1)  # half, then the rest
    assert result["status"] == "failed: bad" and result["summary"] == "none / hard"


def test_run_streaming_stops_a_hanging_command():
    start = time.monotonic()
    rc, lines = common.run_streaming(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout=1)
    assert rc is None and lines == ["started"]
    assert time.monotonic() - start < 30


@pytest.mark.e2e
def test_cpu_check_end_to_end(tmp_path):
    """The tiny check through the shell script, from another folder: every step passes (the CUDA
    tests are skipped), a table is written where --out says, and not in logs/."""
    gpu_table = os.path.join(REPO, "logs", "gpu_check.md")
    before = os.path.getmtime(gpu_table) if os.path.exists(gpu_table) else None
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    bash, script, *flags = shlex.split(readme_command("gpu_check"))  # the README's command, from another folder
    start = time.monotonic()
    proc = subprocess.run([bash, os.path.join(REPO, script), *flags, "--device", "cpu", "--out", "check/table.md"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = (tmp_path / "check" / "table.md").read_text()
    assert text.startswith("# GPU check") and "bash scripts/gpu_check.sh --device cpu --out check/table.md" in text
    assert re.search(r"^- environment: .*torch .*GPU: none", text, flags=re.M)
    rows = table_rows(text)
    assert rows == {gpu_check.TITLES["cuda_tests"]: "skipped: no CUDA",
                    gpu_check.TITLES["pruning_pass"]: "passed", gpu_check.TITLES["deploy_training"]: "passed",
                    gpu_check.TITLES["distilled_student"]: "passed", gpu_check.TITLES["two_ranks"]: "passed",
                    gpu_check.TITLES["deploy_speed"]: "passed"}
    assert "backend gloo" in text and "distillation hard seen" in text
    # the distilled student ran without a teacher and with hard distillation; two ranks ran (gloo on CPU)
    distilled = re.search(r"^\| 4 \| .*$", text, flags=re.M).group(0)
    assert "distillation none seen" in distilled and "distillation hard seen" in distilled
    assert "`deit_test_distilled_patch8_32_deploy`" in text
    assert re.search(r"^\| 5 \| .*x 2 ranks.*backend gloo", text, flags=re.M)
    assert text.count("| CPU | ") == 4  # fp32 and bf16 at two batches
    # progress was printed as it went, in order
    marks = [proc.stdout.index(f"== step {k}/{len(gpu_check.STEPS)}") for k in range(1, len(gpu_check.STEPS) + 1)]
    assert marks == sorted(marks)
    after = os.path.getmtime(gpu_table) if os.path.exists(gpu_table) else None
    assert after == before
    print(f"CPU check took {took:.0f} s")
