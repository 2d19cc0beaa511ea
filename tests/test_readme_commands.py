"""Every command in README.md runs as written, from a clean copy of the repository, or is the
command another end-to-end test runs.

The commands are read from the README's ```bash and ```python blocks, so a command added to
the README without a runner here fails `test_every_readme_command_has_a_runner`. Each runner
only shortens a command: placeholder paths (`/path/...`) become small files made here (an
ImageFolder, random-weight checkpoints), flags appended at the end override the epochs, batch and
image size and put the tiny test model of the same family in place of a full-size one (argparse keeps
the last value; the command's own model name is checked to be one the script accepts), and environment
variables the scripts read shorten the demo. Nothing else of the command is changed. A command
with its own end-to-end test elsewhere is not run twice: that test reads it from here
(`readme_command`), and its runner checks that it does. The numbers a command prints or writes are
checked against bounds its inputs set (the FLOPs target, the image count), never one run's values.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from conftest import free_port

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device", "cpu", "--num_workers", "0"]
TINY_DEIT = "deit_test_patch8_32"  # in place of the DeiT-B of the README's commands (same family, same code)
VAL_IMAGES = 12  # the ImageFolder's val/: 3 classes x 4 images


def readme_commands() -> List[Tuple[str, str]]:
    """(language, command) for each command of the README's bash and python blocks."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    commands = []
    for language, body in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if language == "python":
            commands.append((language, body.strip()))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append((language, line))
    return commands


# (pattern of the command's start, its runner below, how it is covered): "runs" here, shortened as
# the docstring says; "=": the named test runs this very command (read with readme_command)
RUNNERS: List[Tuple[str, str, str]] = [
    (r"python3 -m venv \.venv && .* && bash scripts/demo\.sh$", "demo",
     "runs (1 + 1 epochs, 5% of the batches scored); a second run into the same folder is refused"),
    (r"python -m pytest -q (-m \"not e2e and not slow\" )?tests$", "suite", "the command that runs this test"),
    (r"python main\.py --finetune=/path/deit_base", "prune",
     "runs (the tiny DeiT, 32x32, batch 4, every batch scored)"),
    (r"python main\.py --eval --mask_aware_norm", "eval_pruned", "runs (the tiny DeiT, 32x32, batch 4)"),
    (r"GPU_NUM=8 .*bash scripts/finetune\.sh base$", "finetune",
     "runs (the tiny DeiT, RegNetY-16GF teacher, 1 CPU process, 1 epoch at 32x32)"),
    (r"import torch\nimport models .*\nmodel = models\.load_pruned", "python_snippet", "runs"),
    (r"python -m pruning\.export ", "export", "runs"),
    (r"python -m pruning\.flops ", "flops", "runs"),
    (r"python benchmarks/ablation\.py ", "ablation",
     "= tests/test_ablation_cli.py::test_runs_on_an_image_folder (1 target, 1 seed, 1 + 1 epochs)"),
    (r"python scripts/demo_spread\.py ", "demo_spread", "runs (--seeds 0: the demo run above, reused)"),
    (r"python benchmarks/bench_deploy_speed\.py ", "bench_speed", "runs (DeiT-T, torch, 1 round of 1 call)"),
    (r"python benchmarks/bench_pruning_pass\.py ", "bench_pass", "runs (the tiny test DeiT, 1 batch)"),
    (r"bash scripts/gpu_check\.sh$", "gpu_check", "= tests/test_gpu_check.py::test_cpu_check_end_to_end"),
    (r"torchrun --nnodes=2 --node_rank=\$NODE_RANK ", "finetune_nodes",
     "runs (the tiny DeiT, 2 nodes of 1 CPU process, 1 epoch at 32x32)"),
    (r"sbatch scripts/slurm/\w+\.sbatch$", "sbatch",
     "= tests/test_slurm_launch.py runs each template under stand-ins for srun and scontrol"),
    (r"python run_with_submitit\.py ", "submitit", "runs up to the submission (no SLURM here)"),
    (r"python main\.py --model=vit_base_patch16_224 ", "prune_vit", "runs (the tiny timm ViT, 32x32)"),
    (r"torchrun --nproc_per_node=8 main_deploy\.py --model=vit_base_patch16_224_deploy ", "finetune_vit",
     "runs (the tiny timm ViT, 1 CPU process, 1 epoch)"),
    (r"python main\.py --model=swin_tiny_patch4_window7_224 ", "prune_swin", "runs (the tiny timm Swin, 32x32)"),
    (r"torchrun --nproc_per_node=8 main_deploy\.py --model=swin_tiny_patch4_window7_224_deploy ", "finetune_swin",
     "runs (the tiny timm Swin, 1 CPU process, 1 epoch)"),
    (r"import models\nimport pruning\.search\n", "detector_snippet",
     "= tests/test_swin_detection_scoring.py::test_readme_snippet_scores_prunes_and_rebuilds_the_detector"),
]
# runner -> the runner whose files it reads (run after it; the others run two at a time)
NEEDS = {"demo_spread": "demo", "eval_pruned": "prune", "finetune": "prune", "python_snippet": "prune",
         "export": "prune", "flops": "prune", "finetune_nodes": "prune", "submitit": "prune",
         "finetune_vit": "prune_vit", "finetune_swin": "prune_swin"}
# the longest runners (the demo; bench_pass, 4 processes in a row) start first: no core idles while the last one runs
START_FIRST = ("demo", "bench_pass")


def runner_of(command: str) -> str:
    names = [name for pattern, name, _ in RUNNERS if re.match(pattern, command)]
    assert len(names) == 1, f"README command without exactly one runner in {__file__}: {command!r} ({names})"
    return names[0]


def readme_command(runner: str) -> str:
    """The README's one command of `runner` (for the test that runs it elsewhere)."""
    found = [command for _, command in readme_commands() if runner_of(command) == runner]
    assert len(found) == 1, (runner, found)
    return found[0]


def test_every_readme_command_has_a_runner():
    names = [runner_of(command) for _, command in readme_commands()]
    assert {"demo", "prune", "finetune", "export"} <= set(names)


# ---------------------------------------------------------------------------
# A clean copy of the repository and the files the placeholders stand for
# ---------------------------------------------------------------------------

def _copy_repository(dst: str) -> None:
    """The files git tracks or would add (or the tree without outputs and caches, outside a git checkout)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
    if not names:
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns("output*", ".git", "__pycache__", ".venv"))
        return
    for name in names:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))


def _image_folder(root: str, classes: int = 3, per_class: int = 4) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for i in range(per_class):
                pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"{i}.png"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The repository copy (cwd of every command) and the placeholder substitutions."""
    import timm

    from models import create_model

    base = tmp_path_factory.mktemp("readme")
    repo = str(base / "repo")
    _copy_repository(repo)
    files = base / "files"
    _image_folder(str(files / "imagenet"))
    # the official DeiT files' layout: 1000 classes, trained at another size (pos_embed resampled to 32x32)
    deit = create_model(f"{TINY_DEIT}_deploy", num_classes=1000, img_size=64)
    torch.save({"model": deit.state_dict()}, files / "deit_base_patch16_224.pth")
    regnet = timm.create_model("regnety_160", pretrained=False, num_classes=3)  # a teacher of the data's classes
    torch.save({"model": regnet.state_dict()}, files / "regnety_160.pth")
    (files / "out").mkdir()
    bin_dir = os.path.dirname(sys.executable)  # python, torchrun of this environment first
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               PYTHONPATH=repo)
    return {"repo": repo, "files": str(files), "env": env}


def _substitute(command: str, world: dict) -> str:
    return command.replace("/path/", world["files"] + "/")


def _run(command: str, world: dict, extra: List[str] = (), env: Dict[str, str] = None,
         timeout: int = 900) -> subprocess.CompletedProcess:
    """`command` (placeholders substituted, `extra` appended) in bash, from the repository copy."""
    line = _substitute(command, world) + "".join(f" {subprocess.list2cmdline([e])}" if e else " ''" for e in extra)
    proc = subprocess.run(["bash", "-c", "set -euo pipefail; " + line], cwd=world["repo"],
                          env=dict(world["env"], **(env or {})), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# ---------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------

def _flag_value(command: str, flag: str) -> str:
    match = re.search(rf"{flag}[= ](\S+)", command)
    assert match, f"{flag} not in {command!r}"
    return match.group(1)


def _prune_target() -> float:
    """The FLOPs share the README's DeiT-B pruning command removes (--pruning_flops_percentage)."""
    return float(_flag_value(readme_command("prune"), "--pruning_flops_percentage"))


def _assert_reduction(text: str, pattern: str, target: float) -> None:
    """The FLOPs reduction (%) that `pattern` reads off `text` is within 0.5 points of `target`."""
    found = re.search(pattern, text)
    assert found and abs(float(found.group(1)) - 100 * target) <= 0.5, text[-2000:]


def _assert_accuracy(top1: float, images: int = VAL_IMAGES) -> None:
    """A top-1 (%) over `images` images is a whole number of them."""
    right = top1 * images / 100
    assert 0 <= round(right) <= images and abs(right - round(right)) < 0.01, top1


def _epochs_logged(out: str) -> List[dict]:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def _runs_elsewhere(test_file: str, needle: str) -> None:
    """`test_file` (in tests/) runs the command: its source holds `needle`."""
    with open(os.path.join(ROOT, "tests", test_file)) as f:
        assert needle in f.read(), f"{test_file} does not run the README command ({needle!r})"


def run_demo(command: str, world: dict) -> None:
    # the set-up line: the virtualenv and install are .ci/run's job; its last command is the demo
    demo = command[command.index("bash scripts/demo.sh"):]
    proc = _run(demo, world, env={"PYTHON": sys.executable, "PRETRAIN_EPOCHS": "1", "FINETUNE_EPOCHS": "1",
                                  "FEED_PERCENT": "0.05"})
    table = proc.stdout[proc.stdout.index("| | unpruned"):]
    accuracies = re.findall(r"([\d.]+)%", table.splitlines()[2])
    assert len(accuracies) == 3 and all(0 <= float(a) <= 100 for a in accuracies)
    assert abs(float(re.search(r"\(([\d.]+)% fewer\)", table).group(1)) - 50.0) <= 0.5
    out = os.path.join(world["repo"], "output", "demo")
    for name in ("1_pretrain/best_checkpoint.pth", "1_pretrain/log.txt", "1_pretrain/tensorboard",
                 "2_prune/checkpoint_pruned_00.pth", "2_prune/mask.json", "2_prune/hessian.pickle",
                 "3_finetune/checkpoint.pth", "3_finetune/log.txt", "summary.md", "summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    # a second run into the same folder is refused, and leaves the first one alone
    again = subprocess.run(["bash", "scripts/demo.sh"], cwd=world["repo"], env=world["env"], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: output/demo already holds")


def run_demo_spread(command: str, world: dict) -> None:
    # seed 0 is the demo run above (SEED 0, the same script): a seed with a summary.json is not rerun
    demo = os.path.join(world["repo"], "output", "demo")
    shutil.copytree(demo, os.path.join(world["repo"], "output", "demo_spread", "seed0"))
    _run(command, world, ["--seeds", "0"])
    with open(os.path.join(demo, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(world["repo"], "output", "demo_spread", "demo_spread.json")) as f:
        stats = json.load(f)["stats"]
    for key in ("acc_unpruned", "acc_pruned", "acc_finetuned", "reduction"):  # one seed: its own numbers
        assert stats[key] == {"mean": summary[key], "std": 0.0, "min": summary[key], "max": summary[key]}, key


def run_prune(command: str, world: dict) -> None:
    _check_supported(command)
    proc = _run(command, world, ["--model", TINY_DEIT, "--input-size", "32", "--batch-size", "4",
                                 "--pruning_feed_percent", "1.0", *CPU])
    _assert_reduction(proc.stdout, r"FLOPs reduction \(deploy model, ptflops\): ([\d.]+)%",
                      float(_flag_value(command, "--pruning_flops_percentage")))
    out = os.path.join(world["files"], "out")
    for name in ("checkpoint_pruned_00.pth", "mask.json", "pruning_report.json", "hessian.pickle"):
        assert os.path.isfile(os.path.join(out, name)), name


def run_eval_pruned(command: str, world: dict) -> None:
    _check_supported(command)
    proc = _run(command, world, ["--model", TINY_DEIT, "--input-size", "32", "--batch-size", "4", *CPU])
    found = re.search(rf"accuracy of the gated model \(mask-aware LayerNorm\) on {VAL_IMAGES} images: top-1 ([\d.]+)%",
                      proc.stdout)
    assert found, proc.stdout[-2000:]
    _assert_accuracy(float(found.group(1)))


def run_finetune(command: str, world: dict) -> None:
    # the tiny DeiT in 1 CPU process instead of DeiT-B on 8 GPUs, one short epoch at 32x32; 2 ranks: run_finetune_nodes
    short = command.replace("GPU_NUM=8 ", "GPU_NUM=1 ")
    proc = _run(short, world, ["--model", f"{TINY_DEIT}_deploy", "--epochs", "1", "--input-size", "32",
                               "--batch-size", "2", *CPU])
    # the script's --auto_resume found no checkpoint yet (resuming: tests/test_distributed_matrix.py)
    assert re.search(r"--auto_resume: no \S+checkpoint\.pth yet; starting", proc.stdout), proc.stdout[-2000:]
    _assert_reduction(proc.stdout, r"deploy model: .* FLOPs reduction ([\d.]+)%", _prune_target())
    out = os.path.join(world["repo"], "output", "base_finetune_0.50")
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))
    logged = _epochs_logged(out)
    assert [e["epoch"] for e in logged] == [0]
    _assert_accuracy(logged[0]["test_acc1"])


def run_python_snippet(command: str, world: dict) -> None:
    script = _substitute(command, world) + "\nprint('logits', tuple(logits.shape), bool(logits.isfinite().all()))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=world["repo"], env=world["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logits (1, 3) True" in proc.stdout  # the ImageFolder's 3 classes


def run_export(command: str, world: dict) -> None:
    _run(command, world)
    import onnx

    onnx.checker.check_model(os.path.join(world["files"], "out", "deit_pruned.onnx"))


def run_flops(command: str, world: dict) -> None:
    from models.registry import build_timm_test_model

    _check_supported(command)
    proc = _run(command, world, ["--model", TINY_DEIT])  # the mask's model
    macs = re.search(r"^total (GMACs|MMACs)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", proc.stdout, flags=re.M)
    params = re.search(r"^total params \(M\)\s+([\d.]+)\s+([\d.]+)", proc.stdout, flags=re.M)
    assert macs and params, proc.stdout
    unit, macs_before, macs_after, reduction = macs.groups()
    params_before, params_after = params.groups()
    assert abs(float(reduction) - 100 * _prune_target()) <= 0.5, proc.stdout
    # the mask records the ImageFolder's 3 classes and 32x32: timm's own model of that size, counted by torch
    net = build_timm_test_model(TINY_DEIT, num_classes=3, img_size=32)
    assert float(params_before) == pytest.approx(sum(p.numel() for p in net.parameters()) / 1e6, abs=6e-4)
    # the analytic count of the pruned model is ptflops' count of the deploy model
    counted = re.search(r"^ptflops: ([\d.]+) GMACs, ([\d.]+) M params", proc.stdout, flags=re.M)
    assert counted, proc.stdout
    scale = {"GMACs": 1, "MMACs": 1e-3}[unit]
    assert float(counted.group(1)) == pytest.approx(float(macs_after) * scale, abs=6e-5)
    assert float(counted.group(2)) == pytest.approx(float(params_after), abs=2e-3)


def run_detector_snippet(command: str, world: dict) -> None:
    _runs_elsewhere("test_swin_detection_scoring.py", 'readme_command("detector_snippet")')


def run_ablation(command: str, world: dict) -> None:
    _runs_elsewhere("test_ablation_cli.py", 'readme_command("ablation")')


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def run_bench_speed(command: str, world: dict) -> None:
    mask = "deit_tiny_patch16_224_0.235.json"  # main.py's mask removing 23.5% of DeiT-T's FLOPs
    train = [] if "--train-batch-size" in command else ["--train-batch-size", "2"]
    _run(command, world, ["--models", "deit_tiny_patch16_224", "--masks", f"logs/masks/{mask}", "--runtimes", "torch",
                          "--batch-sizes", "1", "--rounds", "1", "--iters", "1", "--warmup", "0", *train])
    with open(os.path.join(world["repo"], _flag_value(command, "--out"))) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | mask | round_to | pruned units"))
    table = lines[start + 2:]
    table = [dict(zip(_cells(lines[start]), _cells(line))) for line in table[:table.index("")]]
    modes = ["infer b1"] + (["train b2"] if train else [])
    assert [(r["model"], r["mask"], r["mode"]) for r in table] == [("DeiT-T", f"`{mask}`", m) for m in modes], table
    target = float(re.search(r"_([\d.]+)\.json$", mask).group(1))
    for r in table:
        ratio = float(r["FLOPs ratio"].rstrip("x"))  # main.py lands within 0.5% of the target, 2 decimals
        assert 1 / (1 - target + 0.005) - 0.005 <= ratio <= 1 / (1 - target - 0.005) + 0.005, r
        before, after = map(float, r["GMACs before -> after"].split(" -> "))
        assert before / after == pytest.approx(ratio, abs=0.02), r
        if not r["img/s unpruned"].startswith("not published"):  # a wall-clock row on a busy CPU
            unpruned, pruned = float(r["img/s unpruned"]), float(r["img/s pruned"])
            assert unpruned > 0 and pruned > 0
            assert float(r["speedup (min-max)"].split()[0]) == pytest.approx(pruned / unpruned, rel=0.01, abs=0.01)


def run_bench_pass(command: str, world: dict) -> None:
    proc = _run(command, world, ["--model", "deit_test_patch8_32", "--input-size", "32", "--batch-size", "2",
                                 "--batches", "1", "--repeats", "1", "--micro-batch", "0"])
    times = re.findall(r"^(\(a\) plain forward\+backward|\(b\) reference-style pass|ours)\s+([\d.]+)\s+([\d.]+)",
                       proc.stdout, flags=re.M)
    assert len(times) == 3 and all(float(t) > 0 and float(c) > 0 for _, t, c in times), proc.stdout
    # both passes compute the same criteria and C
    diffs = re.search(r"^max rel diff ours vs \(b\): (.*)$", proc.stdout, flags=re.M).group(1)
    values = dict(part.split() for part in diffs.split(", "))
    assert set(values) == {"heads", "mlp", "embed", "C"} and all(float(v) < 1e-4 for v in values.values()), diffs


def run_gpu_check(command: str, world: dict) -> None:
    _runs_elsewhere("test_gpu_check.py", 'readme_command("gpu_check")')


def run_finetune_nodes(command: str, world: dict) -> None:
    # two "nodes" on this machine, one CPU process each instead of 8 GPUs; the tiny DeiT, one short epoch at 32x32
    _check_supported(command)
    port = str(free_port())
    line = _substitute(command.replace("--nproc_per_node=8 ", "--nproc_per_node=1 ").replace(":29400 ", f":{port} "),
                       world) + " " + " ".join(["--model", f"{TINY_DEIT}_deploy", "--epochs", "1", "--input-size",
                                                "32", "--batch-size", "2", *CPU])
    procs = [subprocess.Popen(["bash", "-c", "set -euo pipefail; " + line], cwd=world["repo"],
                              env=dict(world["env"], NODE_RANK=str(node), MASTER_ADDR="127.0.0.1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    logged = _epochs_logged(_substitute(_flag_value(command, "--output_dir"), world))
    assert [e["epoch"] for e in logged] == [0]
    _assert_accuracy(logged[0]["test_acc1"])  # --dist-eval: the ranks' counts summed
    assert "total batch of 4" in outputs[0] + outputs[1]  # 2 nodes x 1 process x 2 images


def run_sbatch(command: str, world: dict) -> None:
    # no SLURM here: tests/test_slurm_launch.py runs each template under stand-ins for srun and scontrol
    template = command.split()[-1]
    assert os.path.isfile(os.path.join(world["repo"], template)), template
    _runs_elsewhere("test_slurm_launch.py", f'_sbatch("{os.path.basename(template)}"')


def run_submitit(command: str, world: dict) -> None:
    # every flag is checked (the launcher's and main_deploy.py's) before the submission, which needs SLURM;
    # tests/test_slurm_launch.py runs the same launcher with --local and preempts it
    line = _substitute(command, world)
    proc = subprocess.run(["bash", "-c", line], cwd=world["repo"], env=world["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot submit to SLURM here"), proc.stderr


def _tiny_timm_weights(path: str, name: str) -> None:
    """timm's own tiny model `name` (the ImageFolder's 3 classes) saved where the command expects timm's
    model.safetensors."""
    import safetensors.torch

    from models.registry import build_timm_test_model

    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        net = build_timm_test_model(name, num_classes=3)
        safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def _check_supported(command: str) -> None:
    """The command's own (full-size) model name is one both scripts accept."""
    from models import arch_of, is_deploy_name

    name = _flag_value(command, "--model")
    arch_of(name)
    assert is_deploy_name(name) == ("main_deploy.py" in command)


def _prune_family(command: str, world: dict, tiny: str) -> None:
    # the full-size model replaced by the tiny timm model of the same family (appended --model), at 32x32
    _check_supported(command)
    _tiny_timm_weights(_substitute(_flag_value(command, "--finetune"), world), tiny)
    proc = _run(command, world, ["--model", tiny, "--input-size", "32", "--batch-size", "4",
                                 "--pruning_feed_percent", "1.0", *CPU])
    _assert_reduction(proc.stdout, r"FLOPs reduction \(deploy model, ptflops\): ([\d.]+)%",
                      float(_flag_value(command, "--pruning_flops_percentage")))
    out = _substitute(_flag_value(command, "--output_dir"), world)
    for name in ("checkpoint_pruned_00.pth", "mask.json", "pruning_report.json", "hessian.pickle"):
        assert os.path.isfile(os.path.join(out, name)), name


def _finetune_family(command: str, world: dict, tiny: str, prune_runner: str) -> None:
    # one CPU process instead of 8 GPUs, the tiny model (student and teacher), one short epoch at 32x32
    _check_supported(command)
    short = command.replace("--nproc_per_node=8 ", "--nproc_per_node=1 ")
    _tiny_timm_weights(_substitute(_flag_value(command, "--teacher-path"), world), tiny)
    proc = _run(short, world, ["--model", tiny + "_deploy", "--teacher-model", tiny,
                               "--epochs", "1", "--input-size", "32", "--batch-size", "2", *CPU])
    _assert_reduction(proc.stdout, r"deploy model: .* FLOPs reduction ([\d.]+)%",
                      float(_flag_value(readme_command(prune_runner), "--pruning_flops_percentage")))
    out = _substitute(_flag_value(command, "--output_dir"), world)
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))
    logged = _epochs_logged(out)
    assert [e["epoch"] for e in logged] == [0]
    _assert_accuracy(logged[0]["test_acc1"])


def run_prune_vit(command: str, world: dict) -> None:
    _prune_family(command, world, "vit_test_patch8_32")


def run_finetune_vit(command: str, world: dict) -> None:
    _finetune_family(command, world, "vit_test_patch8_32", "prune_vit")


def run_prune_swin(command: str, world: dict) -> None:
    _prune_family(command, world, "swin_test_patch2_window4_32")


def run_finetune_swin(command: str, world: dict) -> None:
    _finetune_family(command, world, "swin_test_patch2_window4_32", "prune_swin")


RUN: Dict[str, Callable[[str, dict], None]] = {name[4:]: fn for name, fn in globals().items()
                                               if name.startswith("run_") and callable(fn)}


def test_readme_commands_run_as_written(world):
    """Every command but the suite's, two at a time (the commands use one thread each), START_FIRST first, then in
    README order, except that a command waits for the runner whose files it reads (NEEDS)."""
    pending = [(runner_of(command), command) for _, command in readme_commands()]
    pending = [(name, command) for name, command in pending if name != "suite"]
    expected = {name for name, _ in pending}
    running: Dict[object, str] = {}
    done = set()
    with ThreadPoolExecutor(max_workers=2) as pool:
        while pending or running:
            ready = sorted([(n, c) for n, c in pending if n not in NEEDS or NEEDS[n] in done],
                           key=lambda item: item[0] not in START_FIRST)  # stable: README order otherwise
            for name, command in ready[:2 - len(running)]:  # none queued behind a failure
                pending.remove((name, command))
                running[pool.submit(RUN[name], command, world)] = name
            assert running, f"commands waiting for a runner that never runs: {pending}"
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # the runner's failed assertion, if any
                if name not in running.values() and all(n != name for n, _ in pending):
                    done.add(name)
    assert done == expected
