"""The Swin family: gated (all gates 1) == timm's SwinTransformer, deploy == gated with mask-aware
norms, the mask, the architecture read from timm's names, and timm / official weight files.
Random weights; one full-size forward per required name (marked slow)."""
import argparse
import json

import pytest
import torch

from conftest import images, randomize_, random_subset_mask
from models import PruneMask, SwinMask, arch_of, build_deploy_model, create_model, load_pruned
from models.loading import adapt_state_dict
from models.registry import build_timm_test_model
from utils import UserError

TINY = "swin_test_patch2_window4_32"
REQUIRED = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
            "swin_base_patch4_window12_384"]
ATOL = 1e-5


def timm_swin(name: str, seed: int = 1, scale: float = 0.1):
    """timm's Swin for `name` with seeded random weights (biases and norms too)."""
    import timm

    model = build_timm_test_model(name) if name == TINY else timm.create_model(name, pretrained=False)
    return randomize_(model, seed, scale).eval()


def gated_twin(reference, name: str, mask_aware_norm: bool = False):
    gated = create_model(name, mask_aware_norm=mask_aware_norm)
    gated.load_state_dict(adapt_state_dict(reference.state_dict(), gated), strict=True)
    return gated.eval()


# -- the architecture --------------------------------------------------------------------------

@pytest.mark.parametrize("name, depths, widths, heads, window, img", [
    ("swin_tiny_patch4_window7_224", (2, 2, 6, 2), (96, 192, 384, 768), (3, 6, 12, 24), 7, 224),
    ("swin_small_patch4_window7_224", (2, 2, 18, 2), (96, 192, 384, 768), (3, 6, 12, 24), 7, 224),
    ("swin_base_patch4_window7_224", (2, 2, 18, 2), (128, 256, 512, 1024), (4, 8, 16, 32), 7, 224),
    ("swin_base_patch4_window12_384", (2, 2, 18, 2), (128, 256, 512, 1024), (4, 8, 16, 32), 12, 384),
])
def test_arch_read_from_timm(name, depths, widths, heads, window, img):
    arch = arch_of(name)
    assert (arch.depths, arch.widths, arch.num_heads, arch.img_size) == (depths, widths, heads, img)
    assert arch.window_sizes == (window,) * 4 and arch.head_dim == 32 and arch.patch_norm
    assert [arch.stage_shift(s) for s in range(4)] == [window // 2] * 3 + [0]  # the last grid is one window


def test_tiny_layout_clamps_windows_as_timm_does():
    arch, reference = arch_of(TINY), build_timm_test_model(TINY)
    blocks = [b for stage in reference.layers for b in stage.blocks]
    ours = [(arch.stage_window(s), arch.stage_shift(s) if b % 2 else 0)
            for s, d in enumerate(arch.depths) for b in range(d)]
    assert ours == [(tuple(b.window_size)[0], tuple(b.shift_size)[0]) for b in blocks]
    assert [w for w, _ in ours] == [4, 4, 4, 4, 4, 4, 2, 2] and [s for _, s in ours] == [0, 2, 0, 2, 0, 0, 0, 0]


@pytest.mark.parametrize("kwargs, words", [
    (dict(img_size=200), ["input size 200", "2^(stages-1) = 32"]),  # a 25x25 stage-1 grid cannot be merged
    (dict(img_size=256), ["input size 256", "64x64 grid", "window 7"]),
    (dict(img_size=240), ["input size 240", "stage"]),
])
def test_input_sizes_that_break_the_windows_are_one_line_errors(kwargs, words):
    with pytest.raises(UserError) as err:
        arch_of("swin_tiny_patch4_window7_224", **kwargs)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_the_input_size_flag_is_checked_against_the_windows_before_any_run():
    from args import check_input_size

    ns = argparse.Namespace(model="swin_tiny_patch4_window7_224", input_size=256)
    with pytest.raises(UserError) as err:
        check_input_size(ns, arch_of(ns.model))
    assert str(err.value).startswith("--input-size 256 does not fit --model swin_tiny_patch4_window7_224: ")
    ns.input_size = None
    check_input_size(ns, arch_of(ns.model))
    assert ns.input_size == 224


def test_swin_v2_is_refused_naming_what_is_missing():
    with pytest.raises(UserError) as err:
        arch_of("swinv2_tiny_window8_256")
    assert "cosine attention" in str(err.value) and "continuous position bias" in str(err.value)


# -- 1. gated (all gates 1) == timm ------------------------------------------------------------

@pytest.mark.parametrize("mask_aware_norm", [False, True], ids=["ref_norm", "mask_aware_norm"])
def test_gated_equals_timm_tiny(mask_aware_norm):
    reference = timm_swin(TINY)
    gated = gated_twin(reference, TINY, mask_aware_norm)
    x = images(gated.arch)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(gated(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(gated.forward_features(x), reference.forward_features(x), atol=ATOL, rtol=0)
    assert expected.abs().max() > 0.05
    with torch.enable_grad():  # the explicit (twice differentiable) attention of the pruning pass
        torch.testing.assert_close(gated(x).detach(), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", REQUIRED)
def test_full_size_gated_and_deploy_equal_timm(name):
    reference = timm_swin(name, scale=0.02)
    gated = gated_twin(reference, name)
    deploy = build_deploy_model(gated.arch, PruneMask.full(gated.arch), weights=gated.state_dict()).eval()
    x = images(gated.arch, n=1)
    with torch.no_grad():
        expected = reference(x)
        diff_gated = (gated(x) - expected).abs().max().item()
        diff_deploy = (deploy(x) - expected).abs().max().item()
    print(f"{name}: max |logit diff| gated {diff_gated:.2e}, deploy {diff_deploy:.2e}")
    assert diff_gated <= ATOL and diff_deploy <= ATOL


# -- 2. deploy == gated (mask-aware norms) -----------------------------------------------------

CASES = {  # seed, branches emptied (block, component): block 2 is stage 1's first block
    "random": (0, ()),
    "emptied": (1, ((0, "heads"), (1, "mlp"), (7, "heads"))),
    "stage_start_emptied": (2, ((2, "heads"), (2, "mlp"), (3, "heads"))),  # stage 1 opens with no branch
    "all_emptied": (3, "all"),
}


@pytest.mark.parametrize("embed", [False, True], ids=["heads_neurons", "with_embed"])
@pytest.mark.parametrize("case", list(CASES))
def test_deploy_equals_gated(case, embed):
    reference = timm_swin(TINY, seed=3)
    gated = gated_twin(reference, TINY, mask_aware_norm=True)
    seed, empty = CASES[case]
    mask = random_subset_mask(gated.arch, seed, embed=embed, empty=empty)
    mask.apply_to(gated)
    deploy = build_deploy_model(gated.arch, mask, weights=gated.state_dict()).eval()
    assert deploy.structure() == mask.structure()
    x = images(gated.arch)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), gated(x), atol=ATOL, rtol=0)
        for s, (ours, theirs) in enumerate(zip(deploy.forward_stages(x), gated.forward_stages(x))):
            kept = torch.tensor(mask.embed[s])  # residual streams grow: the tolerance scales with them
            torch.testing.assert_close(ours, theirs[..., kept], atol=ATOL * max(1.0, theirs.abs().max().item()), rtol=0)
            pruned = [c for c in range(gated.arch.widths[s]) if c not in mask.embed[s]]
            assert torch.all(theirs[..., pruned] == 0)  # pruned channels carry exactly zero
    merge_biases = [s for s, stage in enumerate(deploy.layers)
                    if stage.downsample is not None and stage.downsample.reduction.bias is not None]
    assert merge_biases == ([1] if case in ("stage_start_emptied", "all_emptied") else []) + \
        ([2, 3] if case == "all_emptied" else [])


def test_deploy_of_a_pruned_model_is_smaller_and_names_follow_timm():
    arch = arch_of(TINY)
    mask = random_subset_mask(arch, 5, embed=True)
    deploy = build_deploy_model(arch, mask)
    full = build_deploy_model(arch)
    assert sum(p.numel() for p in deploy.parameters()) < sum(p.numel() for p in full.parameters())
    timm_keys = set(build_timm_test_model(TINY).state_dict())
    assert set(full.state_dict()) == timm_keys  # no relative_position_index / attn_mask buffers saved
    assert set(deploy.state_dict()) <= timm_keys


# -- the mask ------------------------------------------------------------------------------------

def test_swin_mask_round_trips_through_json_and_gates(tmp_path):
    arch = arch_of(TINY)
    mask = random_subset_mask(arch, 7, embed=True)
    assert isinstance(mask, SwinMask) and mask.total_counts() == {"heads": 60, "mlp": 3840, "embed": 480}
    path = tmp_path / "mask.json"
    mask.save_json(str(path))
    assert json.loads(path.read_text())["family"] == "swin"
    assert PruneMask.load(str(path)) == mask
    gated = create_model(TINY)
    mask.apply_to(gated)
    assert PruneMask.from_gate_state_dict(gated.state_dict()) == mask
    lines = mask.summary_lines()
    assert len(lines) == 3 + arch.depth + 4 and lines[-1].startswith("stage 3: embed pruned")


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["embed"].pop(), ["3 embed lists", "4 stages"]),
    (lambda d: d["embed"].__setitem__(1, []), ["every embedding channel of stage 1"]),
    (lambda d: d["heads"][2].append(99), ["block 2 heads", "index 99"]),
])
def test_malformed_swin_masks_are_one_line_errors(edit, words):
    d = PruneMask.full(arch_of(TINY)).to_dict()
    edit(d)
    with pytest.raises(UserError) as err:
        PruneMask.from_dict(d, source="m.json")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_masks_of_one_family_do_not_fit_the_other():
    with pytest.raises(UserError, match="a Swin mask does not fit a vit model"):
        PruneMask.full(arch_of(TINY)).check_fits(arch_of("deit_test_patch8_32"))
    with pytest.raises(UserError, match="a ViT mask does not fit a swin model"):
        PruneMask.full(arch_of("deit_test_patch8_32")).check_fits(arch_of(TINY))


# -- weight files --------------------------------------------------------------------------------

def _official_layout(sd: dict) -> dict:
    """The official Swin repository's keys: patch merging at the end of stage N - 1, `head.weight`,
    and the saved buffers."""
    out = {}
    for key, value in sd.items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        out[key.replace("head.fc.", "head.")] = value
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    return out


@pytest.mark.parametrize("layout", ["timm_safetensors", "official_pth"])
def test_timm_and_official_files_load(tmp_path, layout):
    reference = timm_swin(TINY, seed=4)
    sd = reference.state_dict()
    if layout == "timm_safetensors":
        from safetensors.torch import save_file

        path = str(tmp_path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = str(tmp_path / "swin_tiny.pth")
        torch.save({"model": _official_layout(sd)}, path)
    model = load_pruned(path, arch_of(TINY))
    x = images(model.arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=0)


def test_weights_of_another_window_are_resampled_as_timm_does(tmp_path):
    import timm
    from timm.models.swin_transformer import SwinTransformer

    config = dict(img_size=64, patch_size=2, num_classes=10, embed_dim=32, depths=(2, 2, 2, 2),
                  num_heads=(2, 4, 8, 16), window_size=8)
    theirs = randomize_(SwinTransformer(**dict(config, window_size=4)), 5).eval()
    path = str(tmp_path / "w4.pth")
    torch.save(theirs.state_dict(), path)
    expected = timm.models.swin_transformer.checkpoint_filter_fn(theirs.state_dict(), SwinTransformer(**config))
    model = load_pruned(path, arch_of(TINY, img_size=64, window_sizes=(8, 8, 8, 8)))
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    torch.testing.assert_close(model.state_dict()[table], expected[table])


# -- export and the hub --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    """main.py's gated checkpoint of a pruned tiny Swin (every stage narrower, stage 1 opens with no
    branch), and the mask-aware gated model it holds."""
    torch.manual_seed(0)
    reference = timm_swin(TINY, seed=6)
    gated = gated_twin(reference, TINY, mask_aware_norm=True)
    mask = random_subset_mask(gated.arch, 8, embed=True, empty=((2, "heads"), (2, "mlp")))
    mask.apply_to(gated)
    path = str(tmp_path_factory.mktemp("swin_ckpt") / "checkpoint_pruned_00.pth")
    torch.save({"model": gated.state_dict(), "mask": mask.to_dict(), "arch": gated.arch.to_dict(),
                "format_version": 1}, path)
    return path, gated


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.e2e), "torchscript",
                                 pytest.param("exported-program", marks=pytest.mark.e2e)])  # e2e: seconds each
def test_a_pruned_swin_exports_and_runs_as_pytorch_does(swin_checkpoint, tmp_path, fmt):
    from pruning.export import main as export_main

    path, gated = swin_checkpoint
    out = str(tmp_path / f"swin.{fmt}")
    export_main([path, "--format", fmt, "--out", out])
    for batch in (1, 5):
        x = images(gated.arch, n=batch, seed=batch)
        with torch.no_grad():
            expected = gated(x)
        if fmt == "onnx":
            import onnxruntime

            got = torch.from_numpy(onnxruntime.InferenceSession(out).run(None, {"images": x.numpy()})[0])
        elif fmt == "torchscript":
            got = torch.jit.load(out)(x)
        else:
            with open(out, "rb") as f:
                got = torch.export.load(f).module()(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_hub_entry_and_features_only_read_a_pruned_swin(swin_checkpoint):
    import hubconf

    path, gated = swin_checkpoint
    model = hubconf.savit_pruned(checkpoint=path)
    x = images(gated.arch)
    features = load_pruned(path, features_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated(x), atol=ATOL, rtol=0)
        maps = features(x)
        theirs = gated.forward_stages(x)
    assert features.channels == model.structure()["width"] == [len(e) for e in model.mask.embed]
    for s, (key, fmap) in enumerate(maps.items()):
        kept = torch.tensor(model.mask.embed[s])
        expected = theirs[s][..., kept].permute(0, 3, 1, 2)
        torch.testing.assert_close(fmap, expected, atol=ATOL * max(1.0, expected.abs().max().item()), rtol=0)
    with pytest.raises(UserError, match="features_only=True needs a Swin"):
        load_pruned(None, arch_of("deit_test_patch8_32"), features_only=True)
