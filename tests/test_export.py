"""pruning.export: checkpoint -> deploy model -> ONNX / TorchScript / torch.export, with a dynamic batch.

Each exported file is run at batch 1 and batch 5 and compared with the PyTorch deploy model;
the deploy model rebuilt from a checkpoint is compared with the gated model it came from
(mask-aware LayerNorm: the exact pruned network) or with the deploy model that was saved.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import GatedViT, arch_of, create_model
from models import build_deploy_model
from pruning.export import check_writable, load_deploy_checkpoint, main
from models.mask import PruneMask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN, DISTILLED = "deit_test_patch8_32", "deit_test_distilled_patch8_32"


def pruning_mask(arch, seed: int) -> PruneMask:
    """Heads, neurons and channels pruned; block 0 loses every head, block 1 every neuron."""
    g = torch.Generator().manual_seed(seed)

    def some(n: int, k: int) -> list:
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    heads = [[]] + [some(arch.num_heads, arch.num_heads - 1 - i % 2) for i in range(1, arch.depth)]
    mlp = [some(arch.mlp_hidden, arch.mlp_hidden // 3), []] + [some(arch.mlp_hidden, arch.mlp_hidden // 2)
                                                                for _ in range(2, arch.depth)]
    mask = PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=heads, mlp=mlp, embed=some(arch.embed_dim, arch.embed_dim * 5 // 8))
    mask.validate()
    return mask


def gated_model(name: str, seed: int) -> GatedViT:
    """A gated model with noisy weights (logits of order 1) and the mask's 0/1 gates."""
    model = create_model(name, mask_aware_norm=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "gate" not in key:
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(1 + noise if "norm" in key and key.endswith("weight") else noise)
    pruning_mask(model.arch, seed).apply_to(model)
    return model.eval()


def gated_checkpoint(model: GatedViT) -> dict:
    """What main.py writes as checkpoint_pruned_00.pth."""
    mask = PruneMask.from_gate_state_dict(model.state_dict())
    return {"model": model.state_dict(), "mask": mask.to_dict(), "arch": model.arch.to_dict(),
            "args": {"model": PLAIN, "input_size": 32, "pruning_flops_percentage": 0.5, "resume": ""},
            "format_version": 1}


def deploy_checkpoint(model: GatedViT) -> dict:
    """What main_deploy.py writes as checkpoint.pth (deploy weights, training state, mask, arch)."""
    mask = PruneMask.from_gate_state_dict(model.state_dict())
    deploy = build_deploy_model(model.arch, mask, weights=model.state_dict())
    optimizer = torch.optim.AdamW(deploy.parameters(), lr=1e-3)
    return {"format_version": 1, "model": deploy.state_dict(), "mask": mask.to_dict(),
            "arch": deploy.arch.to_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": {"last_epoch": 3},
            "scaler": None, "model_ema": None, "epoch": 3, "max_accuracy": 12.5,
            "args": {"model": DISTILLED, "batch_size": 8, "lr": 1e-3, "betas": None}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (path, the gated model it came from)}: a plain gated and a distilled deploy checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind, name, make in (("gated", PLAIN, gated_checkpoint), ("deploy", DISTILLED, deploy_checkpoint)):
        model = gated_model(name, seed=len(out) + 1)
        path = str(folder / f"{kind}.pth")
        torch.save(make(model), path)
        out[kind] = (path, model)
    return out


def images(arch, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, arch.in_chans, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["gated", "deploy"])
def test_checkpoint_rebuilds_the_pruned_network(checkpoints, kind):
    path, gated = checkpoints[kind]
    model, arch = load_deploy_checkpoint(path)
    assert arch == gated.arch and not model.training
    s = model.structure()
    assert s["heads"][0] == 0 and s["hidden"][1] == 0 and s["width"] < arch.embed_dim
    assert model.blocks[0].attn is None and model.blocks[1].mlp is None
    x = images(arch, 3)
    with torch.no_grad():
        out, ref = model(x), gated(x)
    assert out.shape == (3, arch.num_classes)  # distilled too: one tensor, the heads' mean in eval mode
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.e2e  # a subprocess or ONNX export: seconds, not milliseconds
def test_onnx_runtime_matches_pytorch_at_batch_1_and_5(checkpoints, tmp_path, capsys):
    """One ONNX export (seconds each): the distilled deploy checkpoint; the gated kind is
    exported by the TorchScript / torch.export test, through the same deploy model."""
    import onnx
    import onnxruntime as ort

    kind = "deploy"
    path, _ = checkpoints[kind]
    out = str(tmp_path / "model.onnx")
    main([path, "--format", "onnx", "--out", out, "--opset", "18"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out} (onnx, opset 18, ") and " MB)" in line
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temporary file left behind

    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    model, arch = load_deploy_checkpoint(path)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str)  # a symbolic batch size
    assert inp.shape[1:] == [arch.in_chans, arch.img_size, arch.img_size]
    for n in (1, 5):
        x = images(arch, n, seed=n)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape == (n, arch.num_classes)
        diff = float(np.abs(got - want).max())
        print(f"onnx {kind} batch {n}: max abs diff {diff:.3g}")
        assert diff <= 1e-4


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["deit3_test_patch8_32", "vit_test_reg4_gap_patch8_32", "vit_test_gap_patch8_32",
                                  "vit_test_prenorm_qknorm_patch8_32"])
def test_onnx_export_of_every_vit_family_matches_the_gated_model(name, tmp_path):
    """LayerScale, registers, avg pooling + fc_norm, norm_pre and qk_norm survive slicing and export:
    ONNX Runtime on the exported deploy model == the gated model with mask-aware norm."""
    import onnxruntime as ort

    gated = gated_model(name, seed=7)
    path, out = str(tmp_path / "checkpoint_pruned_00.pth"), str(tmp_path / "model.onnx")
    torch.save(gated_checkpoint(gated), path)
    main([path, "--format", "onnx", "--out", out])
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = images(gated.arch, 3, seed=1)
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = gated(x).numpy()
    assert np.abs(want).max() > 0.1
    assert float(np.abs(got - want).max()) <= 1e-4


@pytest.mark.parametrize("kind", ["gated", "deploy"])
@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torchscript_and_exported_program_reload_with_same_logits(checkpoints, kind, fmt, tmp_path, capsys):
    path, _ = checkpoints[kind]
    out = str(tmp_path / ("model.pt" if fmt == "torchscript" else "model.pt2"))
    main([path, "--format", fmt, "--out", out, "--batch-size", "3"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote {out} ({fmt}, ")
    loaded = torch.jit.load(out) if fmt == "torchscript" else torch.export.load(out).module()
    model, arch = load_deploy_checkpoint(path)
    for n in (1, 5):
        x = images(arch, n, seed=10 + n)
        with torch.no_grad():
            got, want = loaded(x), model(x)
        assert got.shape == want.shape == (n, arch.num_classes)
        diff = float((got - want).abs().max())
        print(f"{fmt} {kind} batch {n}: max abs diff {diff:.3g}")
        assert diff <= 1e-5


def test_bad_checkpoints_give_one_line_errors(tmp_path, checkpoints, capsys):
    def error_of(ckpt) -> str:
        with pytest.raises(SystemExit) as exc:
            main([str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        return err

    assert "not found" in error_of(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("hello")
    assert "not a readable torch file" in error_of(tmp_path / "text.pth")
    torch.save({"model": GatedViT(arch_of(PLAIN)).state_dict()}, tmp_path / "bare.pth")
    assert "no 'mask'/'arch' entry" in error_of(tmp_path / "bare.pth")
    torch.save({"model": {}, "mask": {}, "arch": {}, "args": torch.nn.Linear(2, 2)}, tmp_path / "obj.pth")
    assert "not a checkpoint this project wrote" in error_of(tmp_path / "obj.pth")
    # a checkpoint whose weights belong to another mask
    ckpt = torch.load(checkpoints["deploy"][0], weights_only=True)
    ckpt["mask"]["mlp"][0] = ckpt["mask"]["mlp"][0][:-1]
    torch.save(ckpt, tmp_path / "other_mask.pth")
    assert "does not fit the model" in error_of(tmp_path / "other_mask.pth")
    assert not (tmp_path / "m.pt").exists()


def test_bad_output_and_flags_give_one_line_errors(tmp_path, checkpoints, capsys):
    path = checkpoints["gated"][0]
    cases = {
        ("--format", "onnx", "--out", str(tmp_path)): "is a folder",
        ("--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")): "does not exist",
        ("--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--opset", "18"): "onnx only",
        ("--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--opset", "13"): "17 or more",
        ("--format", "exported-program", "--out", str(tmp_path / "m.pt2"), "--batch-size", "1"): "at least 2",
    }
    for flags, expected in cases.items():
        with pytest.raises(SystemExit) as exc:
            main([path, *flags])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and expected in err, (flags, err)
    assert os.listdir(tmp_path) == []
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(Exception, match="cannot write"):
            check_writable(str(tmp_path / "ro" / "m.onnx"))


@pytest.mark.e2e  # a subprocess or ONNX export: seconds, not milliseconds
def test_cli_unwritable_out_exits_2_with_one_line(tmp_path, checkpoints):
    """The command line's exit status and one line; the other one-line errors (a missing checkpoint among
    them) go through the same `main` in this process: test_bad_checkpoints_give_one_line_errors and
    test_bad_output_and_flags_give_one_line_errors."""
    proc = subprocess.run([sys.executable, "-m", "pruning.export", checkpoints["gated"][0], "--out",
                           str(tmp_path / "missing" / "m.onnx"), "--format", "onnx"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []
