"""Every supported timm ViT family against timm itself: the tiny configuration of each family
(models.registry.TEST_CONFIGS) and one full-size model per family, random weights.

  1. gated model (all gates 1) with timm's weights == timm's logits;
  2. deploy == gated under masks, emptied branches and LayerScale folds included;
  3. timm `.safetensors`, {'model': sd} `.pth` and official DeiT III key layouts load;
  4. pos_embed resampled to another image size == timm's own resampling;
  5. where the embedding gate sits;
  6. unsupported timm models: one-line UserError; `arch_of` of the usual names.
"""
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from conftest import MASK_CASES, images, mask_case, random_subset_mask, randomize_
from models import arch_of, build_deploy_model, create_model
from models.loading import adapt_state_dict, load_pretrained
from models.registry import TEST_CONFIGS, build_timm_test_model
from utils import UserError

ATOL = 1e-5
TINY = list(TEST_CONFIGS)
# one full-size model per family (the smallest timm has of it: two cores run the forwards)
FULL_SIZE = [
    "deit_tiny_distilled_patch16_224",   # DeiT, distillation token
    "vit_tiny_patch16_224",              # ViT (AugReg)
    "deit3_small_patch16_224",           # DeiT III: no_embed_class, LayerScale
    "vit_little_patch16_reg4_gap_256",   # 4 registers, no class token, avg pool + fc_norm, LayerScale
    "vit_medium_patch16_gap_256",        # avg pool without fc_norm, LayerScale
    "vit_medium_patch16_clip_224",       # CLIP: norm_pre, patch conv without bias, eps 1e-5
]


def randomize_vit_(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Seeded noise in every weight, norm and token; LayerScale gammas in [0.5, 1.5] (timm's
    1e-5 / 1e-6 would make the blocks vanish and hide any error in them)."""
    randomize_(model, seed, scale)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def timm_reference(name: str, seed: int = 0, scale: float = 0.1, **overrides) -> torch.nn.Module:
    """timm's own model of `name` (a tiny configuration or a timm name), randomised, eval mode."""
    import timm

    if name in TEST_CONFIGS:
        model = build_timm_test_model(name, **overrides)
    else:
        with torch.device("meta"):  # skip timm's init: every value is overwritten below
            model = timm.create_model(name, pretrained=False, **overrides)
        model = model.to_empty(device="cpu")
    return randomize_vit_(model, seed, scale).eval()


def gated_from(reference: torch.nn.Module, name: str, mask_aware_norm: bool = False, **kwargs):
    gated = create_model(name, mask_aware_norm=mask_aware_norm, **kwargs)
    gated.load_state_dict(adapt_state_dict(reference.state_dict(), gated), strict=True)
    return gated.eval()


def assert_logits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.abs().max() > 0.05  # random weights give logits of a visible size


# -- 1. gated (all gates 1) == timm --------------------------------------------------------

@pytest.mark.parametrize("mask_aware_norm", [False, True], ids=["ref_norm", "mask_aware_norm"])
@pytest.mark.parametrize("name", TINY)
def test_gated_equals_timm_tiny(name, mask_aware_norm):
    reference = timm_reference(name, seed=1)
    gated = gated_from(reference, name, mask_aware_norm)
    x = images(gated.arch)
    with torch.no_grad():
        torch.testing.assert_close(gated.forward_features(x), reference.forward_features(x), atol=ATOL, rtol=0)
        out = gated(x)
        assert out.shape == (x.shape[0], gated.arch.num_classes)
        assert_logits_equal(out, reference(x))
        if gated.arch.distilled:  # each head alone, and eval mode's mean of the two
            feats, ours = reference.forward_features(x), gated.forward_features(x)
            ref_cls, ref_dist = reference.head(feats[:, 0]), reference.head_dist(feats[:, 1])
            torch.testing.assert_close(out, (ref_cls + ref_dist) / 2, atol=ATOL, rtol=0)
            torch.testing.assert_close(gated.head(ours[:, 0]), ref_cls, atol=ATOL, rtol=0)
            torch.testing.assert_close(gated.head_dist(ours[:, 1]), ref_dist, atol=ATOL, rtol=0)


# -- 2. deploy == gated --------------------------------------------------------------------

# besides conftest's cases: (seed, branch emptied, branch that must stay kept)
EXTRA_CASES = {
    # block 0's attention emptied: its constant (proj bias times LayerScale) folds into the embedding
    "first_attn_emptied": (5, (0, "heads"), (0, "mlp")),
    # an MLP emptied after a kept (LayerScale) attention branch: folded into that branch, divided by its gamma
    "mlp_emptied_after_kept": (6, (1, "mlp"), (1, "heads")),
}
CASES = list(MASK_CASES) + list(EXTRA_CASES)


def family_mask(arch, case: str, embed: bool):
    if case in MASK_CASES:
        return mask_case(arch, case, embed=embed)
    seed, emptied, kept = EXTRA_CASES[case]
    mask = random_subset_mask(arch, seed, embed=embed, empty=[emptied])
    block, part = kept
    units = mask.heads if part == "heads" else mask.mlp
    units[block] = units[block] or [0]
    mask.validate()
    return mask


def gated_and_deploy(name: str, case: str, embed: bool, seed: int = 3, scale: float = 0.1):
    """Gated model with timm's random weights and a mask (mask-aware norm when embedding channels
    are pruned), and the deploy model sliced from it."""
    reference = timm_reference(name, seed=seed, scale=scale)
    gated = gated_from(reference, name, mask_aware_norm=embed)
    mask = family_mask(gated.arch, case, embed)
    mask.apply_to(gated)
    deploy = build_deploy_model(gated.arch, mask, weights=gated.state_dict()).eval()
    return mask, gated, deploy


@pytest.mark.parametrize("embed", [False, True], ids=["heads_neurons", "with_embed"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", TINY)
def test_deploy_equals_gated_tiny(name, case, embed):
    mask, gated, deploy = gated_and_deploy(name, case, embed)
    assert deploy.structure() == mask.structure()
    x = images(gated.arch)
    e = torch.tensor(mask.embed)
    with torch.no_grad():
        assert_logits_equal(deploy(x), gated(x))
        feats = gated.forward_features(x)
        torch.testing.assert_close(deploy.forward_features(x), feats[..., e], atol=ATOL, rtol=0)
    # pruned channels carry exactly zero
    assert torch.all(feats[..., [c for c in range(mask.embed_dim) if c not in mask.embed]] == 0)


def test_layer_scale_fold_with_zero_gamma_channels():
    """Block 0's MLP emptied after its kept attention: the MLP's constant gamma2 * fc2.bias is folded
    into attn.proj.bias / gamma1. A channel where gamma1 is 0 is fine when the constant is 0 there
    too; where it is not, slicing refuses instead of changing the network."""
    from models.mask import PruneMask

    reference = timm_reference("deit3_test_patch8_32", seed=5)
    gated = gated_from(reference, "deit3_test_patch8_32")
    mask = PruneMask.full(gated.arch)
    mask.mlp[0] = []
    mask.apply_to(gated)
    with torch.no_grad():
        gated.blocks[0].ls1.gamma[5] = 0.0
        gated.blocks[0].ls2.gamma[5] = 0.0
    deploy = build_deploy_model(gated.arch, mask, weights=gated.state_dict()).eval()
    x = images(gated.arch)
    with torch.no_grad():
        assert_logits_equal(deploy(x), gated(x))
        gated.blocks[0].ls2.gamma[5] = 1.0
    with pytest.raises(ValueError, match="ls1.gamma is zero where the constant is not"):
        build_deploy_model(gated.arch, mask, weights=gated.state_dict())


# -- 1. + 2. full size: gated == timm, and deploy == gated -----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_family_matches_timm_and_deploy(name):
    # weights of scale 0.02 (timm's init) keep fp32 round-off of 12+ wide blocks below the tolerance
    reference = timm_reference(name, seed=2, scale=0.02)
    gated = gated_from(reference, name, mask_aware_norm=True)
    x = images(gated.arch, n=1)
    with torch.no_grad():
        ours = gated(x)
        assert_logits_equal(ours, reference(x))
        mask = family_mask(gated.arch, "emptied", embed=True)
        mask.apply_to(gated)
        deploy = build_deploy_model(gated.arch, mask, weights=gated.state_dict()).eval()
        assert_logits_equal(deploy(x), gated(x))


# -- 3. checkpoint files ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["safetensors", "model_entry"])
@pytest.mark.parametrize("name", TINY)
def test_timm_files_load(tmp_path, name, layout):
    reference = timm_reference(name, seed=4)
    sd = reference.state_dict()
    if layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "model.pth"
        torch.save({"model": sd}, path)
    model = create_model(name).eval()
    load_pretrained(model, str(path))
    x = images(model.arch)
    with torch.no_grad():
        assert_logits_equal(model(x), reference(x))
    assert all(torch.all(g == 1) for g in model.gate_parameters())


def test_official_deit3_layout_loads(tmp_path):
    """The DeiT III repository names LayerScale `blocks.N.gamma_1` / `gamma_2`."""
    reference = timm_reference("deit3_test_patch8_32", seed=5)
    sd = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
          for k, v in reference.state_dict().items()}
    assert "blocks.0.gamma_1" in sd and not any(".ls1." in k for k in sd)
    path = tmp_path / "deit3_official.pth"
    torch.save({"model": sd}, path)
    model = create_model("deit3_test_patch8_32").eval()
    load_pretrained(model, str(path))
    x = images(model.arch)
    with torch.no_grad():
        assert_logits_equal(model(x), reference(x))


# -- 4. pos_embed resampling -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["deit3_test_patch8_32", "vit_test_reg4_gap_patch8_32",
                                  "deit_test_distilled_patch8_32"])
def test_pos_embed_resampling_matches_timm(tmp_path, name):
    """Trained at 32, used at 48: timm's own checkpoint filter (bicubic, no antialiasing: DeiT's
    recipe) on timm's model at 48 gives the same pos_embed and logits."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    reference = timm_reference(name, seed=6)
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(path))
    model = create_model(name, img_size=48).eval()
    load_pretrained(model, str(path))

    timm48 = build_timm_test_model(name, img_size=48).eval()
    timm48.load_state_dict(checkpoint_filter_fn(reference.state_dict(), timm48, antialias=False), strict=True)
    arch = model.arch
    prefix_rows = arch.num_pos_tokens - arch.num_patches  # 0 with no_embed_class
    direct = resample_abs_pos_embed(reference.pos_embed.detach(), [6, 6], num_prefix_tokens=prefix_rows,
                                    antialias=False)
    assert model.pos_embed.shape == direct.shape == (1, prefix_rows + 36, arch.embed_dim)
    torch.testing.assert_close(model.pos_embed.detach(), direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(timm48.pos_embed.detach(), direct, atol=1e-6, rtol=0)
    x = images(arch, n=2)
    with torch.no_grad():
        assert_logits_equal(model(x), timm48(x))


# -- 5. the embedding gate -------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_embedding_gate_placement(name):
    model = randomize_vit_(create_model(name, mask_aware_norm=True), seed=7, scale=0.1).eval()
    arch = model.arch
    calls, block_inputs = [], []
    model.res_gate.register_forward_hook(lambda *_: calls.append(1))
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0]))
    x = images(arch, n=2)
    with torch.no_grad():
        model(x)
        assert len(calls) == 2 * arch.depth + 1 + int(arch.pre_norm)
        channel = 5
        model.res_gate.weight[channel] = 0.0
        block_inputs.clear()
        features = model.forward_features(x)
    assert len(block_inputs) == arch.depth
    for i, inp in enumerate(block_inputs):  # every token, prefix tokens included, in every block
        assert torch.all(inp[..., channel] == 0), i
        assert inp[..., channel + 1].abs().max() > 0, i
    assert torch.all(features[..., channel] == 0)


# -- 6. what is (not) supported ---------------------------------------------------------------

@pytest.mark.parametrize("name, what", [
    ("swinv2_tiny_window8_256", "cosine attention"),      # Swin V2 (Swin V1 is supported)
    ("swinv2_cr_tiny_ns_224", "cosine attention"),
    ("eva02_tiny_patch14_224", "Eva"),
    ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
    ("vit_base_patch16_xp_224", "ParallelScalingBlock"),
    ("vit_base_patch16_rpn_224", "ResPostBlock"),
    ("vit_giant_patch14_dinov2", "GluMlp"),                # SwiGLU (packed) MLP
    ("vit_base_patch16_clip_quickgelu_224", "QuickGELU"),
    ("vit_base_patch16_siglip_224", "'map'"),              # attention pooling
])
def test_unsupported_timm_models_are_one_line_errors(name, what):
    import timm

    assert timm.is_model(name)
    with pytest.raises(UserError) as err:
        arch_of(name)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message and "not supported" in message, message
    assert what in message, message


def _expected(embed_dim, depth, num_heads, img_size=224, patch_size=16, **options):
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, img_size=img_size, patch_size=patch_size,
                **options)


TOKEN = dict(class_token=True, reg_tokens=0, distilled=False, no_embed_class=False, global_pool="token",
             fc_norm=False, pre_norm=False, init_values=None, qkv_bias=True, qk_norm=False, norm_eps=1e-6)
DISTILLED = dict(TOKEN, distilled=True)
DEIT3 = dict(TOKEN, no_embed_class=True, init_values=1e-6)


@pytest.mark.parametrize("name, expected, prefix, pos_rows", [
    ("deit_tiny_patch16_224", _expected(192, 12, 3, **TOKEN), 1, 197),
    ("deit_small_patch16_224", _expected(384, 12, 6, **TOKEN), 1, 197),
    ("deit_base_patch16_224", _expected(768, 12, 12, **TOKEN), 1, 197),
    ("deit_tiny_distilled_patch16_224", _expected(192, 12, 3, **DISTILLED), 2, 198),
    ("deit_small_distilled_patch16_224", _expected(384, 12, 6, **DISTILLED), 2, 198),
    ("deit_base_distilled_patch16_224", _expected(768, 12, 12, **DISTILLED), 2, 198),
    ("vit_tiny_patch16_224", _expected(192, 12, 3, **TOKEN), 1, 197),
    ("vit_small_patch16_224", _expected(384, 12, 6, **TOKEN), 1, 197),
    ("vit_base_patch16_224", _expected(768, 12, 12, **TOKEN), 1, 197),
    ("vit_large_patch16_224", _expected(1024, 24, 16, **TOKEN), 1, 197),
    ("vit_base_patch32_224", _expected(768, 12, 12, patch_size=32, **TOKEN), 1, 50),
    ("vit_base_patch16_384", _expected(768, 12, 12, img_size=384, **TOKEN), 1, 577),
    ("deit3_small_patch16_224", _expected(384, 12, 6, **DEIT3), 1, 196),
    ("deit3_base_patch16_224", _expected(768, 12, 12, **DEIT3), 1, 196),
    ("vit_base_patch16_reg4_gap_256",
     _expected(768, 12, 12, img_size=256, **dict(TOKEN, class_token=False, reg_tokens=4, no_embed_class=True,
                                                   global_pool="avg", fc_norm=True)), 4, 256),
    ("vit_base_patch16_clip_224", _expected(768, 12, 12, **dict(TOKEN, pre_norm=True, norm_eps=1e-5)), 1, 197),
])
def test_arch_of_timm_names(name, expected, prefix, pos_rows):
    arch = arch_of(name)
    assert {k: getattr(arch, k) for k in expected} == expected
    assert (arch.mlp_ratio, arch.num_classes, arch.in_chans) == (4.0, 1000, 3)
    assert arch.num_prefix_tokens == prefix and arch.num_pos_tokens == pos_rows
    assert arch.patch_bias == (not arch.pre_norm)


def test_input_size_defaults_to_the_models_own():
    """Without --input-size a 384 model is not silently resized to 224 (its pos_embed resampled)."""
    import main

    from args import check_input_size

    for name, size in (("vit_base_patch16_384", 384), ("deit_base_patch16_224", 224),
                       ("vit_base_patch16_reg4_gap_256", 256)):
        ns = main.get_args_parser().parse_args(["--model", name])
        assert ns.input_size is None
        check_input_size(ns, arch_of(name))
        assert ns.input_size == size  # the logged configuration holds the size that runs
    ns = main.get_args_parser().parse_args(["--model", "vit_base_patch16_384", "--input-size", "224"])
    check_input_size(ns, arch_of("vit_base_patch16_384"))
    assert ns.input_size == 224


def test_mlp_width_read_back_exactly_and_distilled_options_refused():
    from models import ViTArch

    for width, hidden in ((176, 240), (304, 848), (320, 1088), (768, 3072)):  # hidden / width read back
        assert ViTArch(embed_dim=width, num_heads=width // 16, mlp_ratio=hidden / width).mlp_hidden == hidden
    for options in (dict(global_pool="avg", class_token=False), dict(fc_norm=True), dict(reg_tokens=4),
                    dict(no_embed_class=True)):
        with pytest.raises(UserError, match="distilled"):
            ViTArch(distilled=True, **options)
