"""The gated and deploy models beyond tests/test_vit_families.py (which compares them with timm and
with each other in eval mode): train mode, the gates, emptied branches, the reference LayerNorm; the registry."""
import pytest
import torch

from conftest import MASK_CASES, images, mask_case, randomize_, timm_twin
from models import DeployViT, GatedViT, arch_of, build_deploy_model, create_model, is_prunable, list_models
from models.slicing import deploy_state_dict
from utils import UserError

ATOL = 1e-5

TINY = ["deit_test_patch8_32", "deit_test_distilled_patch8_32", "deit_demo_patch8_32"]


def gated_and_timm(name: str, seed: int):
    gated = randomize_(create_model(name), seed)
    twin = timm_twin(gated.arch)
    twin.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k}, strict=True)
    return gated, twin


# -- 1. gated (all gates 1) == timm in train mode (eval mode: tests/test_vit_families.py) ---------

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
def test_reference_norm_is_another_network_when_channels_are_pruned(name, case):
    """deploy == gated with the mask-aware LayerNorm (tests/test_vit_families.py); the reference's
    LayerNorm (statistics over all D channels) gives another network."""
    mask, gated, deploy = gated_and_deploy(name, case, embed=True, mask_aware_norm=False)
    assert len(mask.embed) < mask.embed_dim
    x = images(gated.arch)
    with torch.no_grad():
        assert (deploy(x) - gated(x)).abs().max() > 1e-3


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
    deploy = DeployViT(arch, **mask.structure())
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
