"""Issue 8, part 6: the embedding row of C uses block 0, the lr schedule never rises after
warm-up, progress lines on a timer, the demo summary evaluates on the runs' own data, and
the warning for an EMA whose horizon exceeds the run."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.scheduler import create_scheduler

import main_deploy
from args import train_config
from engine import ema_horizon_note
from models import DeployViT, arch_of, create_model
from pruning import importance
from pruning.importance import PruningScorer
from pruning.interactions import block_draw, interaction_normalisers
from models.mask import PruneMask
from utils import MetricLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "deit_test_patch8_32"  # 3 blocks, 4 heads, width 64


def randomized(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Seeded noise in every non-gate weight (norm weights around 1), so that outputs vary with the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" not in name:
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model


def soft_cross_entropy(outputs, targets):
    return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


def soft_batch(arch, batch: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, arch.in_chans, arch.img_size, arch.img_size, generator=g, dtype=dtype)
    labels = torch.randint(0, arch.num_classes, (2, batch), generator=g)
    targets = 0.7 * F.one_hot(labels[0], arch.num_classes) + 0.3 * F.one_hot(labels[1], arch.num_classes)
    return images, targets.to(dtype)


# -- 1. the embedding row of C ------------------------------------------------------------

def test_block_draws_use_block_zero_for_the_embedding_row():
    draws = [block_draw(3, k, 12) for k in range(300)]
    assert all(d.m[2] == (0, 0) for d in draws)
    assert any(d.m[0] != (0, 0) or d.m[1] != (0, 0) for d in draws)  # heads/mlp rows still drawn in [0, l]


def test_embedding_row_of_C_equals_brute_force_at_block_zero():
    seed = 5
    model = randomized(create_model(NAME), 1).double().eval()
    arch = model.arch
    depth = arch.depth
    # a batch whose block l is the last one: block 0 and block l differ
    k = next(i for i in range(100) if block_draw(seed, i, depth).l == depth - 1)
    images, targets = soft_batch(arch, 3, seed=2)
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, hessian_embed=6.0, seed=seed)
    scorer.score_batch(images, targets, k)
    _, C = scorer.finalize()

    # brute force: d/dg_j (sum of dL/dg_embed) by plain autograd on the gates
    gates = [g.requires_grad_() for g in model.gate_parameters()]  # gates are frozen by default
    loss = soft_cross_entropy(model(images), targets)
    d_embed, = torch.autograd.grad(loss, gates[-1], create_graph=True)
    wrt = [gates[0], gates[depth], gates[depth - 1], gates[2 * depth - 1]]  # heads, mlp at block 0, then at l
    rows = torch.autograd.grad(d_embed.sum(), wrt)
    n = interaction_normalisers(arch, 6.0)
    expected = [rows[0].sum() / n[2, 0], rows[1].sum() / n[2, 1]]
    at_block_l = [rows[2].sum() / n[2, 0], rows[3].sum() / n[2, 1]]
    torch.testing.assert_close(C[2, :2], torch.stack(expected), rtol=1e-8, atol=1e-16)
    # the check can tell block 0 from block l (the old draws in [0, l])
    assert not torch.allclose(torch.stack(expected), torch.stack(at_block_l), rtol=1e-3)


# -- 2. learning-rate bounds ----------------------------------------------------------------

def lr_sequence(batch_size: int, epochs: int = 30, **flags):
    argv = ["--model", f"{NAME}_deploy", "--batch-size", str(batch_size), "--epochs", str(epochs)]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args, lines = train_config(main_deploy.get_args_parser().parse_args(argv), world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler, num_epochs = create_scheduler(args, optimizer)
    lrs = []
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return args, lrs, lines


def test_small_batch_lr_never_rises_after_warmup():
    args, lrs, lines = lr_sequence(8)  # 5e-4 * 8 / 512 = 7.8e-6 < --min-lr 1e-5
    assert args.lr == pytest.approx(5e-4 * 8 / 512)
    after = lrs[args.warmup_epochs:]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after, after[1:])), after
    assert max(lrs) <= args.lr * (1 + 1e-12)
    assert len(lines) == 1 and "--min-lr lowered from 1e-05 to 7.81e-06" in lines[0]


def test_warmup_lr_above_the_scaled_lr_is_lowered_too():
    args, lrs, lines = lr_sequence(8, warmup_lr=5e-5)
    assert args.warmup_lr == args.min_lr == args.lr
    assert max(lrs) <= args.lr * (1 + 1e-12) and len(lines) == 2 and "--warmup-lr lowered from 5e-05" in lines[1]


def test_large_batch_schedule_untouched():
    args, lrs, lines = lr_sequence(512)
    assert lines == [] and args.min_lr == 1e-5 and args.warmup_lr == 1e-6
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-5)


# -- 3. progress on a timer ----------------------------------------------------------------

class TimedItems:
    """`n` items; fetching one advances the fake clock by `step` seconds."""

    def __init__(self, clock: list, n: int, step: float, item=None):
        self.clock, self.n, self.step, self.item = clock, n, step, item

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            self.clock[0] += self.step
            yield self.item if self.item is not None else torch.zeros(2, 1)


def test_metric_logger_prints_on_a_timer(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for step, expected in ((0.0, [1, 10]), (11.0, [1, 4, 7, 10]), (31.0, list(range(1, 11)))):
        lines = []
        logger = MetricLogger(print_fn=lines.append, device="cpu")
        for _ in logger.log_every(TimedItems(clock, 10, step), 1000, "Epoch: [0]"):
            pass
        done = [int(m) for line in lines[:-1] for m in re.findall(r"\[\s*(\d+)/10\]", line)]
        assert done == expected, (step, lines)
        assert "Total time" in lines[-1]


def test_metric_logger_tiny_interval_prints_every_iteration():
    lines = []
    logger = MetricLogger(print_fn=lines.append, device="cpu")
    for _ in logger.log_every([torch.zeros(1)] * 4, 100, print_seconds=0.0):
        pass
    assert len(lines) == 5 and "samples/s" in lines[1]


def test_pruning_pass_prints_on_a_timer(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr(importance.time, "time", lambda: clock[0])
    model = randomized(create_model(NAME), 0)
    batch = soft_batch(model.arch, 2, seed=1, dtype=torch.float32)
    lines = []
    scorer = PruningScorer(model, soft_cross_entropy)
    # 12 s a batch, a line at least every 30 s: after batches 3 and 6 (72 s, also the last); log_every never fires
    scorer.score_batches(TimedItems(clock, 6, 12.0, batch), 6, log=lines.append, log_every=100)
    assert [re.search(r"\[(\d)/6\]", line).group(1) for line in lines] == ["3", "6"], lines
    assert "eta 0:00:36" in lines[0] and f"{6 / 36:.1f} samples/s" in lines[0]
    lines.clear()
    PruningScorer(model, soft_cross_entropy).score_batches(TimedItems(clock, 3, 0.0, batch), 3, log=lines.append,
                                                           log_every=100, log_seconds=30.0)
    assert len(lines) == 1 and "[3/3]" in lines[0]


# -- 4. the demo summary evaluates on the runs' own data -----------------------------------

def write_image_folder(root, classes: int = 3, per_class: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(root / split / f"class{c}")
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")


def write_runs(out, data_args: dict, arch):
    """The three checkpoints of a demo run (random weights), each recording `data_args`."""
    mask = PruneMask.full(arch, model=NAME)
    mask.heads[0] = [1, 2, 3]
    mask.mlp[1] = list(range(0, arch.mlp_hidden, 2))  # embed channels kept: gated == deploy model exactly
    models = {"unpruned": randomized(DeployViT(arch), 11), "pruned": randomized(create_model(NAME, num_classes=3), 12),
              "finetuned": randomized(DeployViT(arch, **mask.structure()), 13)}
    mask.apply_to(models["pruned"])
    files = {"unpruned": ("1_pretrain", "best_checkpoint.pth", PruneMask.full(arch, model=NAME), "_deploy"),
             "pruned": ("2_prune", "checkpoint_pruned_00.pth", mask, ""),
             "finetuned": ("3_finetune", "best_checkpoint.pth", mask, "_deploy")}
    for step, (folder, name, step_mask, suffix) in files.items():
        os.makedirs(out / folder, exist_ok=True)
        args = {**data_args, "model": NAME + suffix}
        torch.save({"model": models[step].state_dict(), "mask": step_mask.to_dict(), "args": args},
                   out / folder / name)
    return models


def independent_top1(model, folder) -> float:
    """Top-1 (%) on folder/val/*/*.png: plain PIL + ImageNet normalisation (32x32 images: no resize)."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    hits = total = 0
    for label, cls in enumerate(sorted(os.listdir(folder / "val"))):
        for name in sorted(os.listdir(folder / "val" / cls)):
            pixels = np.asarray(Image.open(folder / "val" / cls / name).convert("RGB"), dtype=np.float32) / 255
            x = (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std
            with torch.no_grad():
                hits += int(model.eval()(x[None]).argmax(1).item() == label)
            total += 1
    return 100.0 * hits / total


def run_summary(out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo_summary.py"), "--output_dir", str(out),
                           "--batch-sizes", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


DATA_ARGS = dict(data_set="IMNET", input_size=32, crop_pct=None,
                 not_imagenet_default_mean_and_std=False)


@pytest.mark.e2e  # a subprocess or ONNX export: seconds, not milliseconds
def test_demo_summary_evaluates_on_the_recorded_image_folder(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data)
    arch = arch_of(NAME, num_classes=3)
    models = write_runs(tmp_path / "out", {**DATA_ARGS, "data_path": str(data)}, arch)
    proc = run_summary(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| top-1"))
    assert f"IMNET {data} val, 12 images" in row
    printed = [float(v) for v in re.findall(r"([\d.]+)%", row)]
    expected = [independent_top1(models[k], data) for k in ("unpruned", "pruned", "finetuned")]
    assert printed == pytest.approx(expected, abs=0.006)


@pytest.mark.e2e  # a subprocess or ONNX export: seconds, not milliseconds
def test_demo_summary_refuses_runs_without_or_with_disagreeing_records(tmp_path):
    arch = arch_of(NAME, num_classes=3)
    write_runs(tmp_path / "a", {"data_set": None}, arch)  # nothing recorded
    proc = run_summary(tmp_path / "a")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "records the data set" in proc.stderr
    write_runs(tmp_path / "b", {**DATA_ARGS, "data_path": str(tmp_path)}, arch)
    checkpoint = torch.load(tmp_path / "b" / "2_prune" / "checkpoint_pruned_00.pth", weights_only=False)
    checkpoint["args"]["data_set"] = "DIGITS"
    torch.save(checkpoint, tmp_path / "b" / "2_prune" / "checkpoint_pruned_00.pth")
    proc = run_summary(tmp_path / "b")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "different data" in proc.stderr and "DIGITS" in proc.stderr


# -- 5. EMA horizon --------------------------------------------------------------------------

def test_ema_note_when_the_run_is_shorter_than_the_horizon():
    note = ema_horizon_note(0.99996, 800)
    assert note.count("\n") == 0 and "~25000" in note and "800" in note
    assert f"{0.99996 ** 800:.0%}" in note and "--model-ema-decay 0.9875" in note and "--no-model-ema" in note
    assert ema_horizon_note(0.99, 800) == ""  # horizon 100 steps
    assert ema_horizon_note(0.99996, 30000) == ""
    short = ema_horizon_note(0.999, 5)
    assert "--no-model-ema" in short and "--model-ema-decay" not in short
    suggested = float(re.search(r"--model-ema-decay ([\d.]+)", note).group(1))
    assert 1 / (1 - suggested) <= 800 and suggested ** 800 < 1e-3  # the suggestion forgets its start
