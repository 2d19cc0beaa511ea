"""Gated DeiT == timm's DeiT; deploy DeiT == gated DeiT under a mask; the registry."""
import pytest
import torch

from conftest import MASK_CASES, images, mask_case, randomize_, timm_twin
from models import DeployViT, GatedViT, arch_of, create_model, is_prunable, list_models
from models import build_deploy_model
from models.slicing import deploy_state_dict, deploy_structure
from utils import UserError

ATOL = 1e-5

TINY = ["deit_test_patch8_32", "deit_test_distilled_patch8_32", "deit_demo_patch8_32"]


def gated_and_timm(name: str, seed: int, mask_aware_norm: bool = False):
    gated = randomize_(create_model(name, mask_aware_norm=mask_aware_norm), seed)
    twin = timm_twin(gated.arch)
    twin.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k}, strict=True)
    return gated, twin


# -- 1. gated (all gates 1) == timm --------------------------------------------------------

def _compare_with_timm(name: str, mask_aware_norm: bool = False) -> None:
    gated, twin = gated_and_timm(name, seed=1, mask_aware_norm=mask_aware_norm)
    gated.eval(), twin.eval()
    x = images(gated.arch)
    with torch.no_grad():
        torch.testing.assert_close(gated.forward_features(x), twin.forward_features(x), atol=ATOL, rtol=0)
        out, ref = gated(x), twin(x)
        assert out.shape == (x.shape[0], gated.arch.num_classes)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        if gated.arch.distilled:
            feats = twin.forward_features(x)
            ref_cls, ref_dist = twin.head(feats[:, 0]), twin.head_dist(feats[:, 1])
            torch.testing.assert_close(out, (ref_cls + ref_dist) / 2, atol=ATOL, rtol=0)
            ours = gated.forward_features(x)
            torch.testing.assert_close(gated.head(ours[:, 0]), ref_cls, atol=ATOL, rtol=0)
            torch.testing.assert_close(gated.head_dist(ours[:, 1]), ref_dist, atol=ATOL, rtol=0)
    assert out.abs().max() > 0.1  # random weights give logits of a visible size


@pytest.mark.parametrize("mask_aware_norm", [False, True], ids=["ref_norm", "mask_aware_norm"])
@pytest.mark.parametrize("name", TINY)
def test_gated_equals_timm(name, mask_aware_norm):
    _compare_with_timm(name, mask_aware_norm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_gated_equals_timm_full_size(name):
    _compare_with_timm(name)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_gated_equals_timm_train_mode(name, grad):
    """Train mode, dropout 0: the explicit (twice-differentiable) attention and SDPA both match;
    the distilled model returns the (class, distillation) pair as DeiT's training loop expects."""
    gated, twin = gated_and_timm(name, seed=2)
    gated.train(), twin.train()
    if gated.arch.distilled:
        twin.set_distilled_training(True)
    x = images(gated.arch)
    with torch.set_grad_enabled(grad):
        out, ref = gated(x), twin(x)
    if gated.arch.distilled:
        assert isinstance(out, tuple) and len(out) == 2
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_gates_are_frozen_parameters_with_reference_keys():
    model = create_model("deit_test_patch8_32")
    keys = set(model.state_dict())
    for i in range(3):
        assert {f"blocks.{i}.attn.attn_gate.weight", f"blocks.{i}.mlp.hidden_gate1.weight",
                f"blocks.{i}.res_gate.weight"} <= keys
    assert "res_gate.weight" in keys
    gates = model.gate_parameters()
    assert [g.numel() for g in gates] == [4] * 3 + [256] * 3 + [64]
    assert all(not g.requires_grad and torch.all(g == 1) for g in gates)
    # one shared embedding gate: in parameters() once, not per block
    assert sum(p is model.res_gate.weight for p in model.parameters()) == 1
    assert not any("gate" in n for n, p in model.named_parameters() if p.requires_grad)


# -- 2./3. deploy == gated -------------------------------------------------------------

def gated_and_deploy(name: str, case: str, embed: bool, mask_aware_norm: bool, scale: float = 0.2):
    arch = arch_of(name)
    mask = mask_case(arch, case, embed=embed)
    gated = randomize_(create_model(name, mask_aware_norm=mask_aware_norm), seed=3, scale=scale)
    mask.apply_to(gated)
    deploy = build_deploy_model(arch, mask, weights=gated.state_dict())
    return mask, gated.eval(), deploy.eval()


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("name", TINY)
def test_deploy_equals_gated_heads_and_neurons(name, case):
    mask, gated, deploy = gated_and_deploy(name, case, embed=False, mask_aware_norm=False)
    assert deploy.structure() == deploy_structure(mask)
    x = images(gated.arch)
    with torch.no_grad():
        torch.testing.assert_close(deploy.forward_features(x), gated.forward_features(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(deploy(x), gated(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("name", TINY)
def test_deploy_equals_gated_with_embed_pruning_and_mask_aware_norm(name, case):
    mask, gated, deploy = gated_and_deploy(name, case, embed=True, mask_aware_norm=True)
    assert len(mask.embed) < mask.embed_dim
    x = images(gated.arch)
    e = torch.tensor(mask.embed)
    with torch.no_grad():
        feats = gated.forward_features(x)
        # pruned channels carry exactly zero; kept ones equal the deploy model's
        assert torch.all(feats[..., [c for c in range(mask.embed_dim) if c not in mask.embed]] == 0)
        torch.testing.assert_close(deploy.forward_features(x), feats[..., e], atol=ATOL, rtol=0)
        torch.testing.assert_close(deploy(x), gated(x), atol=ATOL, rtol=0)

        # the reference's LayerNorm (statistics over all D channels) gives another network
        gated.mask_aware_norm = False
        assert (deploy(x) - gated(x)).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("embed, mask_aware_norm", [(False, False), (True, True)], ids=["blocks", "embed"])
def test_deploy_equals_gated_full_size(embed, mask_aware_norm):
    # 12 blocks of width 192: weights of scale 0.1 keep fp32 round-off (summation order differs
    # between the sliced and the zero-gated matmuls) below the tolerance
    mask, gated, deploy = gated_and_deploy("deit_tiny_distilled_patch16_224", "emptied", embed, mask_aware_norm,
                                           scale=0.1)
    x = images(gated.arch, n=2)
    with torch.no_grad():
        out = deploy(x)
        torch.testing.assert_close(out, gated(x), atol=ATOL, rtol=0)
    assert out.abs().max() > 0.1


def test_deploy_train_mode_distilled_pair():
    mask, gated, deploy = gated_and_deploy("deit_test_distilled_patch8_32", "emptied", embed=True,
                                           mask_aware_norm=True)
    gated.train(), deploy.train()
    x = images(gated.arch)
    out, ref = deploy(x), gated(x)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_emptied_branch_has_no_layers_and_slicing_is_pure():
    arch = arch_of("deit_demo_patch8_32")
    mask = mask_case(arch, "emptied", embed=True)
    gated = randomize_(GatedViT(arch), seed=4)
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    sd = deploy_state_dict(mask, gated.state_dict(), arch)
    for k, v in gated.state_dict().items():  # the input is untouched
        assert torch.equal(v, before[k]), k
    assert not any(k.startswith("blocks.0.") for k in sd)  # block 0 emptied entirely
    assert not any("gate" in k for k in sd)
    deploy = DeployViT(arch, **deploy_structure(mask))
    assert deploy.blocks[0].attn is None and deploy.blocks[0].mlp is None
    assert deploy.blocks[1].mlp is None and deploy.blocks[-1].attn is None
    assert all(p.numel() > 0 for p in deploy.parameters())
    # head dim never changes: qkv rows = 3 * kept heads * 16
    assert sum(map(bool, mask.heads)) >= 2
    for block, kept in zip(deploy.blocks, mask.heads):
        if kept:
            assert block.attn.qkv.weight.shape == (3 * len(kept) * 16, len(mask.embed))
            assert block.attn.proj.weight.shape == (len(mask.embed), len(kept) * 16)


# -- registry ---------------------------------------------------------------------------

def test_registry_names_and_timm_fallback():
    names = list_models()
    assert "deit_test_patch8_32" in names and "deit3_test_patch8_32_deploy" in names
    for size in ("tiny", "small", "base"):  # timm's own names, read from timm's configuration
        assert is_prunable(f"deit_{size}_patch16_224") and is_prunable(f"deit_{size}_distilled_patch16_224_deploy")
        assert isinstance(create_model(f"deit_{size}_patch16_224_deploy", depth=1), DeployViT)
    assert isinstance(create_model("deit_test_patch8_32"), GatedViT)
    assert isinstance(create_model("deit_test_patch8_32_deploy"), DeployViT)
    model = create_model("deit_test_patch8_32", num_classes=7, img_size=48, drop_path_rate=0.1)
    assert model.arch.num_classes == 7 and model.pos_embed.shape[1] == 36 + 1
    timm_model = create_model("resnet18", num_classes=3).eval()
    assert not isinstance(timm_model, (GatedViT, DeployViT))
    assert timm_model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UserError) as err:
        create_model("deit_nope_patch16_224")
    message = str(err.value)
    assert "deit_nope_patch16_224" in message
    assert "deit_small_patch16_224" in message and "deit_test_patch8_32" in message
