"""Tests of pruning/baselines.py: magnitude criteria, masks from counts, random and uniform masks."""
import numpy as np
import pytest
import torch

from models import create_model
from pruning.baselines import magnitude_criteria, pruned_counts, random_mask_with_counts, uniform_mask
from models.slicing import deploy_state_dict
from pruning.flops import mask_macs
from models.mask import PruneMask
from pruning.selection import mask_from_counts, max_prunable, protected_count

MODEL = "deit_test_patch8_32"


@pytest.fixture(scope="module")
def arch_and_weights():
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=7, img_size=32)
    return model.arch, model.state_dict()


def matrix_l1(state_dict) -> float:
    """L1 norm of every weight matrix (Linear / conv weights) of a state dict."""
    return sum(float(v.double().abs().sum()) for k, v in state_dict.items()
               if k.endswith(".weight") and v.dim() >= 2)


def one_unit_mask(arch, component: str, block: int, unit: int) -> PruneMask:
    mask = PruneMask.full(arch)
    if component == "heads":
        mask.heads[block].remove(unit)
    elif component == "mlp":
        mask.mlp[block].remove(unit)
    else:
        mask.embed.remove(unit)
    return mask


@pytest.mark.parametrize("component,block,unit", [("heads", 0, 0), ("heads", 1, 1), ("mlp", 0, 5),
                                                  ("mlp", 1, 0), ("embed", 0, 3), ("embed", 0, 0)])
def test_magnitude_is_the_l1_of_the_matrix_entries_the_deploy_model_loses(arch_and_weights, component, block, unit):
    arch, sd = arch_and_weights
    crit = magnitude_criteria(sd, arch)
    lost = matrix_l1(deploy_state_dict(PruneMask.full(arch), sd, arch)) - \
        matrix_l1(deploy_state_dict(one_unit_mask(arch, component, block, unit), sd, arch))
    value = crit["embed"][unit] if component == "embed" else crit[component][block, unit]
    assert float(value) == pytest.approx(lost, rel=1e-9)
    assert crit["heads"].shape == (arch.depth, arch.num_heads)
    assert crit["mlp"].shape == (arch.depth, arch.mlp_hidden)
    assert crit["embed"].shape == (arch.embed_dim,)


def test_mask_from_counts_prunes_the_lowest_units_with_protection(arch_and_weights):
    arch, _ = arch_and_weights
    g = torch.Generator().manual_seed(1)
    scores = {"heads": torch.rand(arch.depth, arch.num_heads, generator=g),
              "mlp": torch.rand(arch.depth, arch.mlp_hidden, generator=g),
              "embed": torch.rand(arch.embed_dim, generator=g)}
    counts = {"heads": 1, "mlp": 20, "embed": 5}
    mask = mask_from_counts(scores, arch, counts)
    assert pruned_counts(mask) == counts
    # brute force: the 5 lowest embedding channels (none protected at this count) are the pruned ones
    lowest = set(torch.argsort(scores["embed"])[:5].tolist())
    assert set(range(arch.embed_dim)) - set(mask.embed) == lowest
    # MLP: a global threshold over the unprotected neurons
    protected = {(b, int(j)) for b in range(arch.depth)
                 for j in torch.argsort(-scores["mlp"][b])[:protected_count(arch.mlp_hidden)]}
    free = sorted(((float(scores["mlp"][b, j]), b, j) for b in range(arch.depth) for j in range(arch.mlp_hidden)
                   if (b, j) not in protected))
    expect = {(b, j) for _, b, j in free[:20]}
    got = {(b, j) for b in range(arch.depth) for j in range(arch.mlp_hidden) if j not in mask.mlp[b]}
    assert got == expect


def test_random_mask_is_seeded_and_respects_counts_and_protection(arch_and_weights):
    arch, _ = arch_and_weights
    limit = max_prunable(arch)
    counts = {"heads": limit["heads"], "mlp": 33, "embed": 7}
    a, b, c = (random_mask_with_counts(arch, counts, seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert pruned_counts(a) == counts
    assert all(len(h) >= protected_count(arch.num_heads) for h in a.heads)


def test_uniform_mask_same_fraction_and_closest_to_target(arch_and_weights):
    arch, sd = arch_and_weights
    crit = magnitude_criteria(sd, arch)
    mask, r = uniform_mask(crit, arch, 0.5)
    full = mask_macs(arch)["total"]
    achieved = 1 - mask_macs(arch, mask)["total"] / full
    totals = mask.total_counts()
    counts = pruned_counts(mask)
    for c in counts:  # one fraction for all components
        assert counts[c] == int(np.floor(r * totals[c] + 0.5))
    # brute force over a fine grid of r: no uniform fraction comes closer to the target
    best = min(abs(1 - mask_macs(arch, uniform_mask_at(crit, arch, x))["total"] / full - 0.5)
               for x in np.linspace(0, 0.9, 901))
    assert abs(achieved - 0.5) <= best + 1e-12


def uniform_mask_at(crit, arch, r):
    from pruning.selection import counts_from_ratios
    return mask_from_counts(crit, arch, counts_from_ratios(arch, {"heads": r, "mlp": r, "embed": r}))
