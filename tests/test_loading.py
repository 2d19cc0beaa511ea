"""Loading weights and checkpoints: official-format (timm-key) DeiT checkpoints into the gated
models, bad checkpoints, and files from elsewhere that cannot run code (checkpoints load with
`weights_only=True` unless `--trust_checkpoint`, pickles with a numpy-only unpickler)."""
import argparse
import contextlib
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main as prune_main
import main_deploy
from args import error_text
from conftest import images, randomize_, timm_twin
from losses import build_teacher
from models import DeployViT, PruneMask, arch_of, create_model
from models.loading import load_pretrained
from pruning.mask import criteria_shapes
from pruning.pickles import criteria_filename, load_pickles, save_pickles
from utils import (UserError, atomic_torch_save, checkpoint_state, load_resume_weights, load_torch_file,
                   restore_training_state)

ATOL = 1e-5
MODEL = "deit_test_patch8_32"  # embed 64, depth 3, 4 heads, patch 8, 10 classes by default
CPU = torch.device("cpu")


def official_checkpoint(name: str, seed: int = 0, **overrides):
    """timm's own model for the architecture of `name` (with `overrides`), random weights."""
    from models import arch_of

    return randomize_(timm_twin(arch_of(name, **overrides)), seed).eval()


def deit_resample(pos: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """DeiT's fine-tuning recipe (facebookresearch/deit main.py), written out independently."""
    old = int((pos.shape[1] - prefix) ** 0.5)
    tokens = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], tokens.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("layout", ["state_dict", "model_entry", "module_prefix"])
@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_official_checkpoint_loads(tmp_path, name, layout):
    official = official_checkpoint(name)
    sd = official.state_dict()
    if layout == "module_prefix":  # saved from a DistributedDataParallel wrapper
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    else:
        obj = {"model": sd} if layout == "model_entry" else sd
    path = tmp_path / "deit.pth"
    torch.save(obj, path)
    model = create_model(name).eval()
    load_pretrained(model, str(path))
    x = images(model.arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), atol=ATOL, rtol=0)
    assert all(torch.all(g == 1) for g in model.gate_parameters())  # absent gates: all ones


@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_classifier_of_another_size_is_dropped(tmp_path, name, caplog):
    official = official_checkpoint(name, num_classes=1000)
    path = tmp_path / "deit_1k.pth"
    torch.save({"model": official.state_dict()}, path)
    model = create_model(name)  # 10 classes
    own_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head")}
    with caplog.at_level(logging.INFO, logger="models.loading"):
        load_pretrained(model, str(path))
    assert "dropping classifier head" in caplog.text
    loaded = model.state_dict()
    for key, value in own_head.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["head.weight"].shape == (10, 64)
    for key, value in official.state_dict().items():
        if not key.startswith("head"):
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name, new_size", [
    ("deit_test_patch8_32", 48),
    ("deit_test_patch8_32", 16),
    ("deit_test_distilled_patch8_32", 64),
    pytest.param("deit_tiny_patch16_224", 288, marks=pytest.mark.slow),
])
def test_pos_embed_resampled_to_new_grid(tmp_path, name, new_size):
    official = official_checkpoint(name)
    path = tmp_path / "deit.pth"
    torch.save({"model": official.state_dict()}, path)
    model = create_model(name, img_size=new_size).eval()
    load_pretrained(model, str(path))
    arch, pos = model.arch, official.pos_embed.detach()
    grid = new_size // arch.patch_size
    assert model.pos_embed.shape == (1, arch.num_prefix_tokens + grid * grid, arch.embed_dim)
    assert torch.equal(model.pos_embed[:, :arch.num_prefix_tokens], pos[:, :arch.num_prefix_tokens])
    torch.testing.assert_close(model.pos_embed.detach(), deit_resample(pos, arch.num_prefix_tokens, grid),
                               atol=1e-6, rtol=0)
    assert model(images(arch, n=1)).shape == (1, arch.num_classes)


# -- bad checkpoints -------------------------------------------------------------------

def test_missing_and_unreadable_files(tmp_path):
    model = create_model("deit_test_patch8_32")
    missing = tmp_path / "nothere.pth"
    with pytest.raises(UserError, match=r"not found.*nothere\.pth"):
        load_pretrained(model, str(missing))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.pth.*not a readable torch file"):
        load_pretrained(model, str(text))
    odd = tmp_path / "list.pth"
    torch.save([1, 2, 3], odd)
    with pytest.raises(UserError, match=r"list\.pth.*holds no state dict"):
        load_pretrained(model, str(odd))


@pytest.mark.parametrize("change, expected", [
    ("drop", ["missing keys: blocks.1.mlp.fc2.weight"]),
    ("extra", ["unexpected keys: blocks.3.norm1.weight"]),
    ("both", ["missing keys: blocks.1.mlp.fc2.weight", "unexpected keys: blocks.3.norm1.weight"]),
    ("shape", ["shape mismatch", "blocks.0.attn.qkv.weight"]),
    ("width", ["pos_embed width 32"]),
])
def test_mismatching_keys_name_file_and_keys(tmp_path, change, expected):
    sd = official_checkpoint("deit_test_patch8_32").state_dict()
    if change in ("drop", "both"):
        del sd["blocks.1.mlp.fc2.weight"]
    if change in ("extra", "both"):
        sd["blocks.3.norm1.weight"] = torch.ones(64)
    if change == "shape":
        sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :32]
    if change == "width":
        sd["pos_embed"] = torch.zeros(1, 5, 32)
    path = tmp_path / "odd_deit.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:
        load_pretrained(create_model("deit_test_patch8_32"), str(path))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("source, target, expected", [
    ("deit_test_distilled_patch8_32", "deit_test_patch8_32", "has 1 cls_token, 1 dist_token but"),
    ("deit_test_patch8_32", "deit_test_distilled_patch8_32", "model has 1 cls_token, 1 dist_token"),
])
def test_distilled_and_plain_checkpoints_do_not_mix(tmp_path, source, target, expected):
    path = tmp_path / "deit.pth"
    torch.save(official_checkpoint(source).state_dict(), path)
    with pytest.raises(UserError) as err:
        load_pretrained(create_model(target), str(path))
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


# -- files from elsewhere cannot run code ------------------------------------------------------

class WritesAFile:
    """Unpickling this calls `open(marker, 'w')`: the file appears if the pickle's code runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def open_global() -> str:
    return f"{open.__module__}.{open.__qualname__}"


def one_line(err, field=None) -> str:
    """The line a script prints for the raised `UserError` (its field, when given, checked first)."""
    assert err.value.field == field
    text = error_text(err.value)
    assert "\n" not in text
    return text


def timm_deit(num_classes: int = 10, seed: int = 0):
    """An official-layout DeiT (timm's VisionTransformer, timm key names) of the test size."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                             num_classes=num_classes).eval()


@pytest.mark.parametrize("layout", ["torch_save", "raw_pickle_2", "raw_pickle_4"])
def test_code_in_a_pth_is_refused_and_not_run(tmp_path, layout):
    marker = str(tmp_path / "written_by_the_pickle")
    path = str(tmp_path / "evil.pth")
    if layout == "torch_save":
        torch.save({"model": {"w": torch.ones(2)}, "x": WritesAFile(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(WritesAFile(marker), f, protocol=int(layout[-1]))
    with pytest.raises(UserError) as err:
        load_torch_file(path, "checkpoint", field="finetune")
    text = one_line(err, "finetune")
    assert text.startswith("--finetune: checkpoint file")
    assert path in text and open_global() in text and "pass --trust_checkpoint" in text
    assert not os.path.exists(marker)
    with contextlib.suppress(UserError):  # a raw pickle is no checkpoint, but its payload runs first
        load_torch_file(path, trust=True)  # the payload is real: with the opt-in it runs
    assert os.path.exists(marker)


@pytest.mark.parametrize("name", ["criteria", "hessian"])
def test_code_in_a_criteria_pickle_is_refused_and_not_run(tmp_path, name):
    arch = arch_of(MODEL)
    save_pickles(str(tmp_path), 2, {c: torch.rand(s) for c, s in criteria_shapes(arch).items()}, torch.rand(3, 3))
    marker = str(tmp_path / "written_by_the_pickle")
    target = tmp_path / (criteria_filename(2, 1) if name == "criteria" else "hessian.pickle")
    with open(target, "wb") as f:
        pickle.dump([np.ones(3), WritesAFile(marker)], f)
    with pytest.raises(UserError) as err:
        load_pickles(str(tmp_path), 2, arch, need_hessian=True)
    text = one_line(err, "pruning_pickle_from")
    assert text.startswith("--pruning_pickle_from: ") and str(target) in text and open_global() in text
    assert not os.path.exists(marker)


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_reference_format_pickles_are_read(tmp_path, protocol):
    """The reference pickles a list of float32 arrays (one per block) and C as a float32 array."""
    arch = arch_of(MODEL)
    rng = np.random.default_rng(0)
    criteria = {c: rng.random(s).astype(np.float32) for c, s in criteria_shapes(arch).items()}
    C = rng.random((3, 3)).astype(np.float32)
    for layer, c in enumerate(("heads", "mlp", "embed")):
        value = list(criteria[c]) if criteria[c].ndim == 2 else [criteria[c]]
        with open(tmp_path / criteria_filename(2, layer), "wb") as f:
            pickle.dump(value, f, protocol=protocol)
    with open(tmp_path / "hessian.pickle", "wb") as f:
        pickle.dump(C, f, protocol=protocol)
    loaded, C2 = load_pickles(str(tmp_path), 2, arch)
    for c, value in criteria.items():
        assert np.array_equal(loaded[c].numpy(), value.astype(np.float64)), c
    assert np.array_equal(C2.numpy(), C.astype(np.float64))


def namespace_checkpoint(tmp_path) -> str:
    """A checkpoint like the reference's: weights plus an argparse.Namespace."""
    path = str(tmp_path / "with_namespace.pth")
    torch.save({"model": timm_deit().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    return path


@pytest.mark.parametrize("loader", ["finetune", "teacher", "resume"])
def test_namespace_checkpoint_needs_the_flag(tmp_path, loader):
    path = namespace_checkpoint(tmp_path)
    load = {"finetune": lambda trust: load_pretrained(create_model(MODEL), path, trust=trust),
            "teacher": lambda trust: build_teacher(MODEL, path, 10, CPU, trust=trust),
            "resume": lambda trust: load_torch_file(path, "checkpoint", trust=trust, field="resume")}[loader]
    with pytest.raises(UserError) as err:
        load(False)
    text = one_line(err, {"finetune": None, "teacher": "teacher_path", "resume": "resume"}[loader])
    assert path in text and "argparse.Namespace" in text and "pass --trust_checkpoint" in text
    load(True)


def test_trust_flag_in_both_scripts():
    for parser in (prune_main.get_args_parser(), main_deploy.get_args_parser()):
        assert parser.parse_args([]).trust_checkpoint is False
        assert parser.parse_args(["--trust_checkpoint"]).trust_checkpoint is True
        assert "RUNS CODE" in parser.format_help().replace("\n", " ").upper()


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    path = namespace_checkpoint(tmp_path)
    args = main_deploy.get_args_parser().parse_args(
        ["--model", MODEL + "_deploy", "--data-set", "DIGITS", "--input-size", "32", "--eval", "--device", "cpu",
         "--num_workers", "0", "--resume", path, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main_deploy.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argparse.Namespace" in lines[0] and "--trust_checkpoint" in lines[0], lines


def test_deploy_checkpoint_loads_weights_only(tmp_path):
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler
    from timm.utils import ModelEmaV2

    args = main_deploy.get_args_parser().parse_args(["--model", MODEL + "_deploy", "--epochs", "4",
                                                     "--lr-noise", "0.5", "0.9"])
    arch = arch_of(MODEL)
    mask = PruneMask.full(arch, model=MODEL)
    mask.heads[1] = [0, 2]
    model = DeployViT(arch, **mask.structure())
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # optimiser state with tensors
    scheduler, _ = create_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    args.extra = (np.int64(3), np.float32(0.5), CPU)  # values a run may add; stored as plain values
    state = checkpoint_state(model, mask, optimizer, scheduler, scaler, ModelEmaV2(model), 1, 50.0, args)
    path = str(tmp_path / "checkpoint.pth")
    atomic_torch_save(state, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["args"]["extra"] == [3, 0.5, "cpu"]
    # and it resumes: weights, optimiser, scheduler, scaler, EMA
    fresh = DeployViT(arch, **mask.structure())
    load_resume_weights(loaded, path, fresh, mask)
    optimizer2 = create_optimizer_v2(fresh, **optimizer_kwargs(cfg=args))
    scheduler2, _ = create_scheduler(args, optimizer2)
    start, best = restore_training_state(loaded, optimizer2, scheduler2, torch.amp.GradScaler("cpu"),
                                         ModelEmaV2(fresh), path=path)
    assert (start, best) == (2, 50.0)
