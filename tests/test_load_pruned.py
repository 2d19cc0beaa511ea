"""models.load_pruned: the pruned DeiT from its self-describing file (main.py's gated checkpoint,
main_deploy.py's deploy checkpoint, .safetensors), equal to the gated mask-aware model; torch.hub."""
import argparse
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from conftest import images, random_mask, randomize_
from models import DeployViT, arch_of, create_model, load_pruned
from models.slicing import deploy_state_dict, deploy_structure
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
    mask = random_mask(model.arch, seed, embed=True, empty=((0, "heads"), (1, "mlp")))
    mask.apply_to(model)
    return model.eval(), mask


def deploy_of(model, mask) -> DeployViT:
    deploy = DeployViT(model.arch, **deploy_structure(mask))
    deploy.load_state_dict(deploy_state_dict(mask, model.state_dict(), model.arch))
    return deploy


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (path, the gated model it came from)} for a main.py-style gated checkpoint, a main_deploy-style
    training checkpoint (distilled model) and a .safetensors file."""
    folder = tmp_path_factory.mktemp("pruned")
    out = {}
    model, mask = gated(PLAIN, 1)
    torch.save(model_checkpoint(model, mask, flags()), folder / "checkpoint_pruned_00.pth")
    out["gated"] = (str(folder / "checkpoint_pruned_00.pth"), model)
    model, mask = gated(DISTILLED, 2)
    deploy = deploy_of(model, mask)
    optimizer = torch.optim.AdamW(deploy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    args = flags(not_imagenet_default_mean_and_std=True)
    torch.save(checkpoint_state(deploy, mask, optimizer, scheduler, None, None, 3, 12.5, args), folder / "checkpoint.pth")
    out["deploy"] = (str(folder / "checkpoint.pth"), model)
    save_pruned_safetensors(deploy, mask, args, str(folder / "best_checkpoint.safetensors"))
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


def test_torch_hub_local(files):
    path, reference = files["gated"]
    model = torch.hub.load(ROOT, "savit_pruned", checkpoint=path, source="local")
    assert_same_network(model, reference)
    with pytest.raises(UserError, match="checkpoint=PATH only"):
        torch.hub.load(ROOT, "savit_pruned", checkpoint=path, source="local", pretrained=True)


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
    assert "'embed' must hold sorted distinct indices" in error(tmp_path / "bad_mask.pth")
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
