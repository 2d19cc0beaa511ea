"""Files from elsewhere cannot run code: checkpoints load with `weights_only=True` unless
`--trust_checkpoint`, pickles with a numpy-only unpickler; plus the classifier size of a
masked model, ungated teachers and the class count a mask records (issue 8, parts 5-6)."""
import argparse
import contextlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

import main as prune_main
from args import DistributedConfig, error_text
import main_deploy
from losses import build_teacher
from models import DeployViT, arch_of, create_model
from models.loading import load_pretrained
from pruning.deploy import deploy_structure, load_masked_model
from pruning.flops import arch_for_mask, mask_params
from pruning.mask import PruneMask, criteria_shapes
from pruning.pickles import criteria_filename, load_pickles, save_pickles
from utils import (UserError, atomic_torch_save, checkpoint_state, load_resume_weights, load_torch_file,
                   restore_training_state)

MODEL = "deit_test_patch8_32"  # embed 64, depth 3, 4 heads, patch 8, 10 classes by default
CPU = torch.device("cpu")


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


# -- part 5: checkpoints and pickles ------------------------------------------------------------

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


def test_masked_model_with_namespace_needs_the_flag(tmp_path):
    mask_path, ckpt = pruned_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["args"] = argparse.Namespace(**checkpoint["args"])
    torch.save(checkpoint, ckpt)
    with pytest.raises(UserError) as err:
        load_masked_model(None, ckpt)
    text = one_line(err, "masked_model")
    assert "argparse.Namespace" in text and "pass --trust_checkpoint" in text
    load_masked_model(None, ckpt, trust=True)


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


def test_official_deit_state_dict_loads(tmp_path):
    official = timm_deit()
    for obj in (official.state_dict(), {"model": official.state_dict()}):
        path = str(tmp_path / "deit.pth")
        torch.save(obj, path)
        model = create_model(MODEL).eval()
        load_pretrained(model, path)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), official(x), atol=1e-5, rtol=0)


# -- main.py's and main_deploy.py's own checkpoints ------------------------------------------------

NUM_CLASSES, IMG = 7, 48  # not the model's defaults (10, 32): the mask must record them


def pruned_checkpoint(tmp_path):
    """main.py's outputs for random criteria (no data pass): (mask.json, checkpoint_pruned_00.pth)."""
    out = tmp_path / "pruned"
    args = prune_main.get_args_parser().parse_args(
        ["--model", MODEL, "--input-size", str(IMG), "--need_hessian", "--pruning_flops_percentage", "0.4",
         "--output_dir", str(out), "--device", "cpu"])
    model = create_model(MODEL, num_classes=NUM_CLASSES, img_size=IMG)
    arch = model.arch
    torch.manual_seed(0)
    criteria = {c: torch.rand(s, dtype=torch.float64) for c, s in criteria_shapes(arch).items()}
    C = torch.tensor([[2.0, 0.1, 0.2], [0.1, 1.0, 0.3], [0.2, 0.3, 4.0]], dtype=torch.float64) * 1e-3
    cfg = prune_main.settings(args, DistributedConfig(device="cpu"))
    prune_main.run_pruning(cfg, model, None, NUM_CLASSES, CPU, lambda message: None, pickles=(criteria, C))
    return str(out / prune_main.MASK_NAME), str(out / prune_main.CHECKPOINT_NAME)


def test_main_checkpoint_loads_weights_only(tmp_path):
    mask_path, ckpt = pruned_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["model"] == MODEL
    mask = PruneMask.from_dict(checkpoint["mask"])
    assert (mask.num_classes, mask.img_size) == (NUM_CLASSES, IMG)
    assert PruneMask.load(mask_path) == mask


def test_deploy_checkpoint_loads_weights_only(tmp_path):
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler
    from timm.utils import ModelEmaV2

    args = main_deploy.get_args_parser().parse_args(["--model", MODEL + "_deploy", "--epochs", "4",
                                                     "--lr-noise", "0.5", "0.9"])
    arch = arch_of(MODEL)
    mask = PruneMask.full(arch, model=MODEL)
    mask.heads[1] = [0, 2]
    model = DeployViT(arch, **deploy_structure(mask))
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
    fresh = DeployViT(arch, **deploy_structure(mask))
    load_resume_weights(loaded, path, fresh, mask)
    optimizer2 = create_optimizer_v2(fresh, **optimizer_kwargs(cfg=args))
    scheduler2, _ = create_scheduler(args, optimizer2)
    start, best = restore_training_state(loaded, optimizer2, scheduler2, torch.amp.GradScaler("cpu"),
                                         ModelEmaV2(fresh), path=path)
    assert (start, best) == (2, 50.0)


# -- part 6: classifier size, teachers, mask counts -------------------------------------------------

def test_masked_model_classifier_mismatch_is_an_error(tmp_path):
    _, ckpt = pruned_checkpoint(tmp_path)
    with pytest.raises(UserError) as err:
        load_masked_model(arch_of(MODEL, num_classes=1000, img_size=IMG), ckpt)
    text = one_line(err, "masked_model")
    assert text.startswith(f"--masked_model: {ckpt!r} was trained for {NUM_CLASSES} classes but 1000")
    # the recorded architecture is used when none is given, and the trained classifier is kept
    mask, model = load_masked_model(None, ckpt)
    trained = torch.load(ckpt, weights_only=True)["model"]["head.weight"][:, mask.embed]
    assert model.arch.num_classes == NUM_CLASSES and torch.equal(model.state_dict()["head.weight"], trained)
    same = load_masked_model(arch_of(MODEL, num_classes=NUM_CLASSES, img_size=IMG), ckpt)[1]
    assert torch.equal(same.state_dict()["head.weight"], trained)


def test_deit_teacher_name_with_plain_checkpoint(tmp_path):
    official = timm_deit(num_classes=10, seed=1)
    path = str(tmp_path / "teacher.pth")
    torch.save({"model": official.state_dict()}, path)
    teacher = build_teacher(MODEL, path, 10, CPU)
    assert not any("gate" in k for k in teacher.state_dict())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), official(x), atol=1e-5, rtol=0)


def test_pruned_checkpoint_as_teacher_is_its_deploy_model(tmp_path):
    _, ckpt = pruned_checkpoint(tmp_path)
    _, deploy = load_masked_model(None, ckpt)
    teacher = build_teacher(MODEL, ckpt, NUM_CLASSES, CPU)
    assert teacher.structure() == deploy.structure()
    for key, value in deploy.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_flops_tool_counts_the_params_main_reported(tmp_path):
    mask_path, _ = pruned_checkpoint(tmp_path)
    with open(os.path.join(os.path.dirname(mask_path), prune_main.REPORT_NAME)) as f:
        reported = json.load(f)["deploy_params"]  # main.py's count (ptflops on the deploy model)
    mask = PruneMask.load(mask_path)
    arch = arch_for_mask(MODEL, mask)
    assert (arch.num_classes, arch.img_size) == (NUM_CLASSES, IMG)
    assert mask_params(arch, mask) == reported
    # the command prints the same number
    from pruning import flops

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        flops._main(["--model", MODEL, "--mask", mask_path])
    assert f"total params (M){mask_params(arch) / 1e6:10.3f}{reported / 1e6:12.3f}" in printed.getvalue()
    assert mask_params(arch_of(MODEL), mask) != reported  # the model's defaults would count otherwise


def test_explicit_flags_win_and_old_masks_still_read(capsys):
    arch = arch_of(MODEL)
    mask = PruneMask.full(arch, model=MODEL).for_model(NUM_CLASSES, IMG)
    notes = []
    chosen = arch_for_mask(MODEL, mask, num_classes=3, log=notes.append)
    assert (chosen.num_classes, chosen.img_size) == (3, IMG)
    assert len(notes) == 1 and "num_classes 3" in notes[0] and str(NUM_CLASSES) in notes[0]
    old = mask.to_dict()
    del old["num_classes"], old["img_size"]
    legacy = PruneMask.from_dict(old)
    assert legacy == mask and legacy.num_classes is None
    assert arch_for_mask(MODEL, legacy) == arch  # the model's defaults
    with pytest.raises(UserError, match="num_classes must be a positive integer"):
        PruneMask.from_dict({**old, "num_classes": 0})
