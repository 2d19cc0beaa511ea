"""models.load_pruned: the pruned DeiT from its self-describing file (main.py's gated checkpoint,
main_deploy.py's deploy checkpoint, .safetensors), equal to the gated mask-aware model; torch.hub;
the student, the teacher and the FLOPs count it serves (classifier size, input size, trust)."""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import main as prune_main
from args import DistributedConfig, error_text
from conftest import images, random_subset_mask, randomize_, timm_twin
from losses import build_teacher
from models import DeployViT, PruneMask, arch_of, create_model, load_pruned
from models.slicing import deploy_state_dict
from pruning.flops import arch_for_mask, mask_params
from pruning.mask import criteria_shapes
from utils import UserError, checkpoint_state, model_checkpoint, save_pruned_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN, DISTILLED = "deit_test_patch8_32", "deit_test_distilled_patch8_32"
DEFAULT_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
INCEPTION_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def flags(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"model": PLAIN, "input_size": 32, "not_imagenet_default_mean_and_std": False,
                                 **kwargs})


def gated(name: str, seed: int):
    """A gated model (mask-aware LayerNorm: the exact pruned network) with seeded weights and a mask that
    prunes heads, neurons and channels and empties block 0's heads and block 1's neurons."""
    model = randomize_(create_model(name, mask_aware_norm=True), seed, scale=0.3)
    mask = random_subset_mask(model.arch, seed, embed=True, empty=((0, "heads"), (1, "mlp")))
    mask.apply_to(model)
    return model.eval(), mask


def deploy_of(model, mask) -> DeployViT:
    deploy = DeployViT(model.arch, **mask.structure())
    deploy.load_state_dict(deploy_state_dict(mask, model.state_dict(), model.arch))
    return deploy


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (path, the gated model it came from)} for a main.py-style gated checkpoint, a main_deploy-style
    training checkpoint (distilled model) and a .safetensors file."""
    folder = tmp_path_factory.mktemp("pruned")
    out = {}
    model, mask = gated(PLAIN, 1)
    model.normalization = DEFAULT_NORM
    torch.save(model_checkpoint(model, mask, flags()), folder / "checkpoint_pruned_00.pth")
    out["gated"] = (str(folder / "checkpoint_pruned_00.pth"), model)
    model, mask = gated(DISTILLED, 2)
    deploy = deploy_of(model, mask)
    optimizer = torch.optim.AdamW(deploy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    args = flags(not_imagenet_default_mean_and_std=True)
    deploy.normalization = INCEPTION_NORM
    torch.save(checkpoint_state(deploy, mask, optimizer, scheduler, None, None, 3, 12.5, args), folder / "checkpoint.pth")
    out["deploy"] = (str(folder / "checkpoint.pth"), model)
    save_pruned_safetensors(deploy, mask, str(folder / "best_checkpoint.safetensors"))
    out["safetensors"] = (str(folder / "best_checkpoint.safetensors"), model)
    return out


def assert_same_network(loaded: DeployViT, reference) -> None:
    def shape(arch) -> dict:  # training-only rates (dropout, drop path) aside
        return {k: v for k, v in arch.to_dict().items() if "drop" not in k}

    assert not loaded.training and shape(loaded.arch) == shape(reference.arch)
    x = images(reference.arch, 4, seed=3)
    with torch.no_grad():
        out, ref = loaded(x), reference(x)
    assert ref.abs().max() > 0.1  # logits of a visible size
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gated", "deploy", "safetensors"])
def test_loaded_model_equals_the_gated_mask_aware_model(files, kind):
    path, reference = files[kind]
    model = load_pruned(path)
    s = model.structure()
    assert s["heads"][0] == 0 and s["hidden"][1] == 0 and s["width"] < reference.arch.embed_dim
    assert_same_network(model, reference)
    assert model.normalization == (DEFAULT_NORM if kind == "gated" else INCEPTION_NORM)


@pytest.mark.parametrize("kind", ["gated", "deploy"])
def test_checkpoint_is_self_describing_and_plain(files, kind):
    path, reference = files[kind]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    mask = checkpoint["mask"]
    assert checkpoint["structure"] == {"width": len(mask["embed"]), "heads": [len(h) for h in mask["heads"]],
                                       "hidden": [len(m) for m in mask["mlp"]]}
    assert checkpoint["arch"] == reference.arch.to_dict()
    assert checkpoint["arch"]["num_classes"] == 10 and checkpoint["arch"]["img_size"] == 32
    assert checkpoint["format_version"] == 1 and set(checkpoint["normalization"]) == {"mean", "std"}


def test_safetensors_metadata_and_weights(files):
    from safetensors import safe_open

    path, reference = files["safetensors"]
    assert sorted(os.listdir(os.path.dirname(path))) == ["best_checkpoint.safetensors", "checkpoint.pth",
                                                         "checkpoint_pruned_00.pth"]  # no temporary file left
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["arch"]) == reference.arch.to_dict()
    assert json.loads(meta["normalization"]) == INCEPTION_NORM and json.loads(meta["format_version"]) == 1
    deploy = load_pruned(files["deploy"][0])
    assert json.loads(meta["structure"]) == deploy.structure()
    assert keys == set(deploy.state_dict())


def test_older_checkpoint_without_structure_loads(files, tmp_path):
    for kind in ("gated", "deploy"):
        path, reference = files[kind]
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        del checkpoint["structure"], checkpoint["normalization"]
        torch.save(checkpoint, tmp_path / f"{kind}.pth")
        model = load_pruned(str(tmp_path / f"{kind}.pth"))
        assert model.normalization is None
        assert_same_network(model, reference)


def test_bare_gated_state_dict_with_the_architecture(files, tmp_path):
    """The reference's gated checkpoint: a bare state dict (here saved from DDP) records no architecture."""
    path, reference = files["gated"]
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "reference.pth")
    model = load_pruned(str(tmp_path / "reference.pth"), reference.arch)
    assert model.mask == load_pruned(path).mask
    assert_same_network(model, reference)


def test_torch_hub_local(files):
    path, reference = files["gated"]
    model = torch.hub.load(ROOT, "savit_pruned", checkpoint=path, source="local")
    assert_same_network(model, reference)
    with pytest.raises(UserError, match="checkpoint=PATH only"):
        torch.hub.load(ROOT, "savit_pruned", checkpoint=path, source="local", pretrained=True)


@pytest.mark.e2e  # a fresh interpreter: what a loaded model imports at run time (static rules: test_layers.py)
def test_models_do_not_import_pruning(files):
    """Loading a gated checkpoint slices it with models.slicing: no module of `pruning` is imported."""
    code = ("import sys; from models import load_pruned; load_pruned(sys.argv[1]); "
            "bad = [m for m in sys.modules if m == 'pruning' or m.startswith('pruning.')]; "
            "assert not bad, bad; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, files["gated"][0]], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bad_files_give_one_line_user_errors(files, tmp_path):
    def error(path) -> str:
        with pytest.raises(UserError) as err:
            load_pruned(str(path))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "not found" in error(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("hello")
    assert "not a readable torch file" in error(tmp_path / "text.pth")
    (tmp_path / "text.safetensors").write_text("hello")
    assert "not a readable safetensors file" in error(tmp_path / "text.safetensors")
    import safetensors.torch
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert "not a pruned model" in error(tmp_path / "foreign.safetensors")
    torch.save({"model": create_model(PLAIN).state_dict()}, tmp_path / "bare.pth")
    assert "no 'mask'/'arch' entry" in error(tmp_path / "bare.pth")
    torch.save({"model": {}, "arch": {}, "args": torch.nn.Linear(2, 2)}, tmp_path / "obj.pth")
    assert "not a checkpoint this project wrote" in error(tmp_path / "obj.pth")
    checkpoint = torch.load(files["deploy"][0], map_location="cpu", weights_only=True)
    checkpoint["structure"]["hidden"][0] -= 1  # no longer the mask's
    torch.save(checkpoint, tmp_path / "disagree.pth")
    assert "differs from its 'mask'" in error(tmp_path / "disagree.pth")
    del checkpoint["mask"]  # structure alone: the weights do not fit it
    torch.save(checkpoint, tmp_path / "misfit.pth")
    assert "does not fit the model" in error(tmp_path / "misfit.pth")
    checkpoint = torch.load(files["gated"][0], map_location="cpu", weights_only=True)
    checkpoint["mask"]["embed"] = [99]
    torch.save(checkpoint, tmp_path / "bad_mask.pth")
    assert "embed: index 99 out of range [0, 64)" in error(tmp_path / "bad_mask.pth")
    checkpoint["format_version"] = 99
    torch.save(checkpoint, tmp_path / "future.pth")
    assert "format version 99" in error(tmp_path / "future.pth")


# -- the files the scripts write -----------------------------------------------------------------

def _in_process(module, argv):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            module.main(module.get_args_parser().parse_args(argv))
        except SystemExit as exit_:
            code = exit_.code
    assert code in (0, None), err.getvalue()[-2000:]


@pytest.mark.e2e
def test_files_written_by_main_and_main_deploy(tmp_path):
    """main.py (criteria from pickles) writes checkpoint_pruned_00.pth; main_deploy.py fine-tunes it one
    epoch with --save_safetensors. Each file loads alone, as the network the scripts built."""
    import main as prune_main
    import main_deploy
    from pruning.pickles import save_pickles

    arch = arch_of(PLAIN)
    g = torch.Generator().manual_seed(0)
    save_pickles(str(tmp_path / "pickles"), 2, {"heads": torch.rand(3, 4, generator=g),
                                                "mlp": torch.rand(3, 256, generator=g),
                                                "embed": torch.rand(64, generator=g)})
    data = ["--data-set", "DIGITS", "--input-size", "32", "--num_workers", "0", "--device", "cpu"]
    _in_process(prune_main, ["--model", PLAIN, *data, "--finetune_op", "2", "--pruning_flops_percentage", "0.4",
                             "--pruning_pickle_from", str(tmp_path / "pickles"), "--output_dir", str(tmp_path / "p")])
    pruned = str(tmp_path / "p" / "checkpoint_pruned_00.pth")
    reference = create_model(PLAIN, num_classes=10, img_size=32, mask_aware_norm=True)
    reference.load_state_dict(torch.load(pruned, weights_only=True)["model"])
    assert_same_network(load_pruned(pruned), reference.eval())

    out = tmp_path / "ft"
    _in_process(main_deploy, ["--model", PLAIN + "_deploy", *data, "--batch-size", "64", "--epochs", "1",
                              "--warmup-epochs", "0", "--masked_model", pruned, "--save_safetensors",
                              "--no-model-ema", "--output_dir", str(out)])
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    best = load_pruned(str(out / "best_checkpoint.pth"))
    assert_same_network(load_pruned(str(out / "best_checkpoint.safetensors")), best)
    assert best.structure() == load_pruned(pruned).structure() and best.arch.num_classes == arch.num_classes


# -- the student, the teacher, the counts: the model a pruned file records ----------------------------

MODEL = PLAIN  # embed 64, depth 3, 4 heads, patch 8, 10 classes by default
CPU = torch.device("cpu")
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
    assert checkpoint["normalization"] == DEFAULT_NORM  # the run's (--not_imagenet_default_mean_and_std not given)


def test_student_records_the_runs_normalization(tmp_path):
    import main_deploy

    _, ckpt = pruned_checkpoint(tmp_path)
    ns = main_deploy.get_args_parser().parse_args(["--model", MODEL + "_deploy", "--masked_model", ckpt,
                                                    "--not_imagenet_default_mean_and_std"])
    arch = arch_of(MODEL, num_classes=NUM_CLASSES, img_size=IMG)
    mask, model = main_deploy.build_student(main_deploy.settings(ns, DistributedConfig(device="cpu")), arch, None)
    assert mask is model.mask and {k: list(v) for k, v in model.normalization.items()} == INCEPTION_NORM
    assert checkpoint_state(model, mask, torch.optim.SGD(model.parameters(), lr=0.1),
                            torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1),
                            None, None, 0, 0.0, ns)["normalization"] == INCEPTION_NORM


def test_masked_model_with_namespace_needs_the_flag(tmp_path):
    mask_path, ckpt = pruned_checkpoint(tmp_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["args"] = argparse.Namespace(**checkpoint["args"])
    torch.save(checkpoint, ckpt)
    with pytest.raises(UserError) as err, UserError.about("masked_model"):  # as main_deploy.py reads it
        load_pruned(ckpt, trust=False)
    text = error_text(err.value)
    assert err.value.field == "masked_model" and "\n" not in text
    assert "argparse.Namespace" in text and "pass --trust_checkpoint" in text
    load_pruned(ckpt, trust=True)


def test_masked_model_classifier_mismatch_is_an_error(tmp_path):
    _, ckpt = pruned_checkpoint(tmp_path)
    with pytest.raises(UserError) as err, UserError.about("masked_model"):
        load_pruned(ckpt, arch_of(MODEL, num_classes=1000, img_size=IMG))
    assert error_text(err.value).startswith(f"--masked_model: {ckpt!r} was trained for {NUM_CLASSES} classes but 1000")
    # the recorded architecture is used when none is given, and the trained classifier is kept
    model = load_pruned(ckpt)
    trained = torch.load(ckpt, weights_only=True)["model"]["head.weight"][:, model.mask.embed]
    assert model.arch.num_classes == NUM_CLASSES and torch.equal(model.state_dict()["head.weight"], trained)
    same = load_pruned(ckpt, arch_of(MODEL, num_classes=NUM_CLASSES, img_size=IMG))
    assert torch.equal(same.state_dict()["head.weight"], trained)


def test_deit_teacher_name_with_plain_checkpoint(tmp_path):
    official = randomize_(timm_twin(arch_of(MODEL)), 1).eval()  # timm's DeiT, timm key names
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
    deploy = load_pruned(ckpt)
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
    unrecorded = PruneMask.full(arch, model=MODEL)
    mask = unrecorded.for_model(NUM_CLASSES, IMG)
    assert unrecorded.num_classes is None and unrecorded.img_size is None  # a copy: the mask itself is unchanged
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
