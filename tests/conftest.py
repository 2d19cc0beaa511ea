"""Shared set-up and helpers of the test suite (import them as `from conftest import ...`).

Markers (pytest.ini): `e2e` marks multi-process, subprocess and demo runs and the slowest
in-process checks; the fast subset is `python -m pytest -q -m "not e2e" tests`. `slow` marks
full-size DeiT configurations.
"""
import os
import socket
import sys
from typing import Iterable, Tuple, Union

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny models: one thread is fastest and immune to oversubscription on a busy 2-core machine
torch.set_num_threads(1)

from models.vit_arch import ViTArch  # noqa: E402 (after the sys.path line)
from models.mask import PruneMask  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- seeded masks, weights and images ------------------------------------------------------

# (seed, emptied branches): "all" empties every branch of every block; block -1 is the last
MASK_CASES = {
    "random0": (0, ()),
    "random1": (1, ()),
    "random2": (2, ()),
    "emptied": (3, ((0, "heads"), (0, "mlp"), (1, "mlp"), (-1, "heads"))),
    "all_emptied": (4, "all"),
}


def random_subset_mask(arch: ViTArch, seed: int, embed: bool = False,
                       empty: Union[str, Iterable[Tuple[int, str]]] = ()) -> PruneMask:
    """A seeded random mask: per block a random sorted subset (possibly empty) of heads and of
    neurons; a random non-empty subset of embedding channels when `embed`, else all of them.

    Args:
        arch: the unpruned architecture.
        seed: seed of the subsets.
        embed: whether to prune embedding channels as well.
        empty: (block, 'heads' | 'mlp') branches to empty, or "all".
    """
    g = torch.Generator().manual_seed(seed)

    def subset(n: int, least: int) -> list:
        k = int(torch.randint(least, n + 1, (1,), generator=g))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    heads = [subset(arch.num_heads, 0) for _ in range(arch.depth)]
    mlp = [subset(arch.mlp_hidden, 0) for _ in range(arch.depth)]
    channels = subset(arch.embed_dim, 1) if embed else list(range(arch.embed_dim))
    if empty == "all":
        empty = [(b, c) for b in range(arch.depth) for c in ("heads", "mlp")]
    for block, component in empty:
        {"heads": heads, "mlp": mlp}[component][block] = []
    mask = PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=heads, mlp=mlp, embed=channels)
    mask.validate()
    return mask


def mask_case(arch: ViTArch, case: str, embed: bool = False) -> PruneMask:
    seed, empty = MASK_CASES[case]
    return random_subset_mask(arch, seed, embed=embed, empty=empty)


def randomize_(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Fill every non-gate parameter with seeded noise (norm weights around 1, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            parts = name.split(".")
            is_norm_weight = len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
            p.copy_(1 + noise if is_norm_weight else noise)
    return model


def images(arch: ViTArch, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, arch.in_chans, arch.img_size, arch.img_size, generator=g)


def timm_twin(arch: ViTArch) -> nn.Module:
    """timm's own DeiT class for `arch`."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cls = VisionTransformerDistilled if arch.distilled else VisionTransformer
    return cls(img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
               num_classes=arch.num_classes, embed_dim=arch.embed_dim, depth=arch.depth,
               num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio)


# -- accuracies that do not depend on round-off ---------------------------------------------

def topk_accuracy_bounds(logits: torch.Tensor, labels: torch.Tensor, k: int = 1, rel_tol: float = 1e-4):
    """(lowest, highest) top-k accuracy in % that logits within `rel_tol * max|logit|` of these can give.

    Another batch size, thread count or CPU changes logits by round-off; only an image whose
    k-th and (k+1)-th largest logits lie within twice that of each other can change its outcome.
    """
    logits = logits.double()
    tol = rel_tol * max(1.0, logits.abs().max().item())
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    if k < logits.shape[1]:
        top = logits.topk(k + 1, dim=1).values
        unsure = top[:, k - 1] - top[:, k] <= 2 * tol
    else:
        unsure = torch.zeros_like(hit)
    n = len(labels)
    return 100.0 * (hit & ~unsure).sum().item() / n, 100.0 * (hit | unsure).sum().item() / n


def assert_accuracy(value: float, logits: torch.Tensor, labels: torch.Tensor, k: int = 1, slack: float = 1e-9):
    """`value` (%) is the top-k accuracy of `logits`, up to near-ties (and `slack` for printed rounding)."""
    low, high = topk_accuracy_bounds(logits, labels, k)
    assert low - slack <= value <= high + slack, (value, low, high)


# -- equality and ports -----------------------------------------------------------------

def assert_same(a, b, where="") -> None:
    """Bit-for-bit equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (where, (a.double() - b.double()).abs().max().item())
    else:
        assert a == b, (where, a, b)


def free_port() -> int:
    """A TCP port free on localhost now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
