"""scripts/demo_summary.py: the summary of a demo run evaluates the three checkpoints on the data
set their runs recorded (top-1 against an independent evaluation), and refuses runs that record no
data set or disagree about it, in one line. Random-weight tiny DeiTs; the script's `main` runs in this
process (the README test runs it as a command, inside scripts/demo.sh)."""
import importlib.util
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_
from models import DeployViT, arch_of, create_model
from models.mask import PruneMask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "deit_test_patch8_32"  # 3 blocks, 4 heads, width 64


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
    models = {"unpruned": randomize_(DeployViT(arch), 11, scale=0.3),
              "pruned": randomize_(create_model(NAME, num_classes=3), 12, scale=0.3),
              "finetuned": randomize_(DeployViT(arch, **mask.structure()), 13, scale=0.3)}
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


def run_summary(out, monkeypatch, capsys):
    """(exit status, stdout, stderr) of `scripts/demo_summary.py --output_dir out --batch-sizes 1`."""
    path = os.path.join(ROOT, "scripts", "demo_summary.py")
    spec = importlib.util.spec_from_file_location("demo_summary", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [path, "--output_dir", str(out), "--batch-sizes", "1"])
    try:
        script.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


DATA_ARGS = dict(data_set="IMNET", input_size=32, crop_pct=None,
                 not_imagenet_default_mean_and_std=False)


@pytest.mark.e2e  # three evaluations and throughput runs: seconds
def test_demo_summary_evaluates_on_the_recorded_image_folder(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_image_folder(data)
    arch = arch_of(NAME, num_classes=3)
    models = write_runs(tmp_path / "out", {**DATA_ARGS, "data_path": str(data)}, arch)
    code, out, err = run_summary(tmp_path / "out", monkeypatch, capsys)
    assert code == 0, out[-2000:] + err[-2000:]
    row = next(line for line in out.splitlines() if line.startswith("| top-1"))
    assert f"IMNET {data} val, 12 images" in row
    printed = [float(v) for v in re.findall(r"([\d.]+)%", row)]
    expected = [independent_top1(models[k], data) for k in ("unpruned", "pruned", "finetuned")]
    assert printed == pytest.approx(expected, abs=0.006)


def test_demo_summary_refuses_runs_without_or_with_disagreeing_records(tmp_path, monkeypatch, capsys):
    arch = arch_of(NAME, num_classes=3)
    write_runs(tmp_path / "a", {"data_set": None}, arch)  # nothing recorded
    code, out, err = run_summary(tmp_path / "a", monkeypatch, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "records the data set" in err
    write_runs(tmp_path / "b", {**DATA_ARGS, "data_path": str(tmp_path)}, arch)
    checkpoint = torch.load(tmp_path / "b" / "2_prune" / "checkpoint_pruned_00.pth", weights_only=False)
    checkpoint["args"]["data_set"] = "DIGITS"
    torch.save(checkpoint, tmp_path / "b" / "2_prune" / "checkpoint_pruned_00.pth")
    code, _, err = run_summary(tmp_path / "b", monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "different data" in err and "DIGITS" in err
