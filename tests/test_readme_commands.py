"""Every command in README.md runs as written, from a clean copy of the repository.

The commands are read from the README's ```bash and ```python blocks, so a command added to
the README without a runner here fails `test_every_readme_command_has_a_runner`. Each runner
only shortens a command: placeholder paths (`/path/...`) become small files made here (an
ImageFolder, random-weight DeiT-B and RegNetY-16GF checkpoints), flags appended at the end
override the epochs, batch and image size (argparse keeps the last value), and environment
variables the scripts read shorten the demo. Nothing else of the command is changed.
"""
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from conftest import free_port

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["--device", "cpu", "--num_workers", "0"]


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


# (pattern of the command's start, name of its runner below); "suite" is the test command itself
RUNNERS: List[Tuple[str, str]] = [
    (r"python3 -m venv \.venv && .* && bash scripts/demo\.sh$", "demo"),
    (r"python -m pytest -q (-m \"not e2e\" )?tests$", "suite"),
    (r"python main\.py --finetune=/path/deit_base", "prune"),
    (r"python main\.py --eval --mask_aware_norm", "eval_pruned"),
    (r"GPU_NUM=8 .*bash scripts/finetune\.sh base$", "finetune"),
    (r"import torch\nimport models .*\nmodel = models\.load_pruned", "python_snippet"),
    (r"python -m pruning\.export ", "export"),
    (r"python -m pruning\.flops ", "flops"),
    (r"python benchmarks/ablation\.py ", "ablation"),
    (r"python scripts/demo_spread\.py ", "demo_spread"),
    (r"python benchmarks/bench_deploy_speed\.py ", "bench_speed"),
    (r"python benchmarks/bench_pruning_pass\.py ", "bench_pass"),
    (r"bash scripts/gpu_check\.sh$", "gpu_check"),
    (r"torchrun --nnodes=2 --node_rank=\$NODE_RANK ", "finetune_nodes"),
    (r"sbatch scripts/slurm/\w+\.sbatch$", "sbatch"),
    (r"python run_with_submitit\.py ", "submitit"),
    (r"python main\.py --model=vit_base_patch16_224 ", "prune_vit"),
    (r"torchrun --nproc_per_node=8 main_deploy\.py --model=vit_base_patch16_224_deploy ", "finetune_vit"),
]
# the section "Pruning your own ViT": its own test (test_readme_vit_commands_run_as_written)
VIT_RUNNERS = ("prune_vit", "finetune_vit")


def runner_of(command: str) -> str:
    names = [name for pattern, name in RUNNERS if re.match(pattern, command)]
    assert len(names) == 1, f"README command without exactly one runner in {__file__}: {command!r} ({names})"
    return names[0]


def test_every_readme_command_has_a_runner():
    names = [runner_of(command) for _, command in readme_commands()]
    assert {"demo", "prune", "finetune", "export"} <= set(names)


# ---------------------------------------------------------------------------
# A clean copy of the repository and the files the placeholders stand for
# ---------------------------------------------------------------------------

def _copy_repository(dst: str) -> None:
    """The files git tracks (or the tree without outputs and caches, outside a git checkout)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
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
    deit = create_model("deit_base_patch16_224_deploy", num_classes=1000)
    torch.save({"model": deit.state_dict()}, files / "deit_base_patch16_224.pth")  # the official files' layout
    regnet = timm.create_model("regnety_160", pretrained=False, num_classes=3)  # a teacher of the data's classes
    torch.save({"model": regnet.state_dict()}, files / "regnety_160.pth")
    (files / "out").mkdir()
    bin_dir = os.path.dirname(sys.executable)  # python, torchrun of this environment first
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               PYTHONPATH=repo)
    return {"repo": repo, "files": str(files), "env": env, "results": {}}


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

def run_demo(command: str, world: dict) -> None:
    # the set-up line: the virtualenv and install are .ci/run's job; its last command is the demo
    demo = command[command.index("bash scripts/demo.sh"):]
    proc = _run(demo, world, env={"PYTHON": sys.executable, "PRETRAIN_EPOCHS": "2", "FINETUNE_EPOCHS": "1",
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


def run_prune(command: str, world: dict) -> None:
    _run(command, world, ["--input-size", "32", "--batch-size", "4", "--pruning_feed_percent", "1.0", *CPU])
    out = os.path.join(world["files"], "out")
    for name in ("checkpoint_pruned_00.pth", "mask.json", "pruning_report.json", "hessian.pickle"):
        assert os.path.isfile(os.path.join(out, name)), name


def run_eval_pruned(command: str, world: dict) -> None:
    proc = _run(command, world, ["--input-size", "32", "--batch-size", "4", *CPU])
    assert re.search(r"accuracy of the gated model \(mask-aware LayerNorm\) on 12 images: top-1 [\d.]+%", proc.stdout)


def run_finetune(command: str, world: dict) -> None:
    # 2 CPU processes instead of 8 GPUs; one short epoch at 32x32
    short = command.replace("GPU_NUM=8 ", "GPU_NUM=2 ")
    extra = ["--epochs", "1", "--input-size", "32", "--batch-size", "2", *CPU]
    _run(short, world, extra)
    out = os.path.join(world["repo"], "output", "base_finetune_0.50")
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))
    with open(os.path.join(out, "log.txt")) as f:
        assert [__import__("json").loads(line)["epoch"] for line in f] == [0]
    # the same command again resumes (--auto_resume) instead of starting over
    proc = _run(short, world, ["--epochs", "2", "--input-size", "32", "--batch-size", "2", *CPU])
    assert "resum" in proc.stdout.lower()
    with open(os.path.join(out, "log.txt")) as f:
        assert [__import__("json").loads(line)["epoch"] for line in f] == [0, 1]


def run_python_snippet(command: str, world: dict) -> None:
    script = _substitute(command, world) + "\nprint('logits', tuple(logits.shape))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=world["repo"], env=world["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logits (1, 3)" in proc.stdout  # the ImageFolder's 3 classes


def run_export(command: str, world: dict) -> None:
    _run(command, world)
    import onnx

    onnx.checker.check_model(os.path.join(world["files"], "out", "deit_pruned.onnx"))


def run_flops(command: str, world: dict) -> None:
    proc = _run(command, world)
    assert "ptflops" in proc.stdout.lower()


def run_ablation(command: str, world: dict) -> None:
    _run(command, world, ["--seeds", "0", "--targets", "0.5", "--pretrain_epochs", "1", "--finetune_epochs", "1",
                          "--feed_percent", "0.1", "--jobs", "1", "--methods", "savit", "savit_rb", "first_order"])
    out = os.path.join(world["repo"], "output", "ablation")
    with open(os.path.join(out, "ablation.md")) as f:
        table = f.read()
    assert "SAViT, rb estimator of C" in table and "## 50% of the FLOPs removed" in table
    assert os.path.isfile(os.path.join(out, "pretrain", "best_checkpoint.pth"))


def run_demo_spread(command: str, world: dict) -> None:
    _run(command, world, ["--seeds", "0"], env={"PRETRAIN_EPOCHS": "1", "FINETUNE_EPOCHS": "1",
                                                "FEED_PERCENT": "0.05"})
    assert os.path.isfile(os.path.join(world["repo"], "output", "demo_spread", "demo_spread.json"))


def run_bench_speed(command: str, world: dict) -> None:
    proc = _run(command, world, ["--models", "deit_tiny_patch16_224", "--masks",
                                 "logs/masks/deit_tiny_patch16_224_0.235.json", "--runtimes", "torch",
                                 "--batch-sizes", "1", "--rounds", "1", "--iters", "1", "--warmup", "0",
                                 "--train-batch-size", "2"])
    assert "DeiT-T" in proc.stdout


def run_bench_pass(command: str, world: dict) -> None:
    proc = _run(command, world, ["--model", "deit_test_patch8_32", "--input-size", "32", "--batch-size", "2",
                                 "--batches", "1", "--repeats", "1", "--micro-batch", "0"])
    assert "ours" in proc.stdout


def run_gpu_check(command: str, world: dict) -> None:
    _run(command, world)  # no GPU here: the tiny check on CPU
    with open(os.path.join(world["repo"], "output", "gpu_check", "gpu_check.md")) as f:
        assert "| 2 | pruning pass | passed |" in f.read()


def run_finetune_nodes(command: str, world: dict) -> None:
    # two "nodes" on this machine, one CPU process each instead of 8 GPUs; one short epoch at 32x32
    port = str(free_port())
    line = _substitute(command.replace("--nproc_per_node=8 ", "--nproc_per_node=1 ").replace(":29400 ", f":{port} "),
                       world) + " " + " ".join(["--epochs", "1", "--input-size", "32", "--batch-size", "2", *CPU])
    procs = [subprocess.Popen(["bash", "-c", "set -euo pipefail; " + line], cwd=world["repo"],
                              env=dict(world["env"], NODE_RANK=str(node), MASTER_ADDR="127.0.0.1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    out = _substitute(_flag_value(command, "--output_dir"), world)
    with open(os.path.join(out, "log.txt")) as f:
        assert [__import__("json").loads(line)["epoch"] for line in f] == [0]
    assert "total batch of 4" in outputs[0] + outputs[1]  # 2 nodes x 1 process x 2 images


def run_sbatch(command: str, world: dict) -> None:
    # no SLURM here: tests/test_slurm_launch.py runs each template under stand-ins for srun and scontrol
    template = command.split()[-1]
    assert os.path.isfile(os.path.join(world["repo"], template)), template
    with open(os.path.join(ROOT, "tests", "test_slurm_launch.py")) as f:
        assert f'_sbatch("{os.path.basename(template)}"' in f.read(), template


def run_submitit(command: str, world: dict) -> None:
    # every flag is checked (the launcher's and main_deploy.py's) before the submission, which needs SLURM;
    # tests/test_slurm_launch.py runs the same launcher with --local and preempts it
    line = _substitute(command, world)
    proc = subprocess.run(["bash", "-c", line], cwd=world["repo"], env=world["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot submit to SLURM here"), proc.stderr


def _flag_value(command: str, flag: str) -> str:
    match = re.search(rf"{flag}=(\S+)", command)
    assert match, f"{flag} not in {command!r}"
    return match.group(1)


def _tiny_vit_weights(path: str) -> None:
    """timm's own tiny ViT (the ImageFolder's 3 classes) saved where the command expects timm's model.safetensors."""
    import safetensors.torch

    from models.registry import build_timm_test_model

    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        net = build_timm_test_model("vit_test_patch8_32", num_classes=3)
        safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def _check_supported(command: str) -> None:
    """The command's own (full-size) model name is one both scripts accept."""
    from models import arch_of, is_deploy_name

    name = _flag_value(command, "--model")
    arch_of(name)
    assert is_deploy_name(name) == ("main_deploy.py" in command)


def run_prune_vit(command: str, world: dict) -> None:
    # the full-size ViT-B replaced by the tiny timm ViT of the same family (appended --model), at 32x32
    _check_supported(command)
    _tiny_vit_weights(_substitute(_flag_value(command, "--finetune"), world))
    proc = _run(command, world, ["--model", "vit_test_patch8_32", "--input-size", "32", "--batch-size", "4",
                                 "--pruning_feed_percent", "1.0", *CPU])
    reduction = re.search(r"FLOPs reduction \(deploy model, ptflops\): ([\d.]+)%", proc.stdout)
    assert reduction and abs(float(reduction.group(1)) - 50.0) <= 0.5, proc.stdout[-2000:]
    out = _substitute(_flag_value(command, "--output_dir"), world)
    for name in ("checkpoint_pruned_00.pth", "mask.json", "pruning_report.json", "hessian.pickle"):
        assert os.path.isfile(os.path.join(out, name)), name


def run_finetune_vit(command: str, world: dict) -> None:
    # one CPU process instead of 8 GPUs, the tiny ViT (student and teacher), one short epoch at 32x32
    _check_supported(command)
    short = command.replace("--nproc_per_node=8 ", "--nproc_per_node=1 ")
    _tiny_vit_weights(_substitute(_flag_value(command, "--teacher-path"), world))
    proc = _run(short, world, ["--model", "vit_test_patch8_32_deploy", "--teacher-model", "vit_test_patch8_32",
                               "--epochs", "1", "--input-size", "32", "--batch-size", "2", *CPU])
    reduction = re.search(r"deploy model: .* FLOPs reduction ([\d.]+)%", proc.stdout)
    assert reduction and abs(float(reduction.group(1)) - 50.0) <= 0.5, proc.stdout[-2000:]
    out = _substitute(_flag_value(command, "--output_dir"), world)
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))
    with open(os.path.join(out, "log.txt")) as f:
        assert [__import__("json").loads(line)["epoch"] for line in f] == [0]


RUN: Dict[str, Callable[[str, dict], None]] = {name[4:]: fn for name, fn in globals().items()
                                               if name.startswith("run_") and callable(fn)}


def test_readme_commands_run_as_written(world):
    """In README order: the ImageNet commands build on each other's files."""
    ran = []
    for _, command in readme_commands():
        name = runner_of(command)
        if name == "suite" or name in VIT_RUNNERS:  # the command that runs this test; the next test's
            continue
        RUN[name](command, world)
        ran.append(name)
    assert "finetune" in ran and ran.index("prune") < ran.index("eval_pruned") < ran.index("export")


def test_readme_vit_commands_run_as_written(world):
    """The section "Pruning your own ViT": main.py, then main_deploy.py on its output."""
    ran = []
    for _, command in readme_commands():
        name = runner_of(command)
        if name in VIT_RUNNERS:
            RUN[name](command, world)
            ran.append(name)
    assert ran == list(VIT_RUNNERS)
