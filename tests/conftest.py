"""Shared set-up and helpers of the test suite (import them as `from conftest import ...`).

Markers (pytest.ini): `e2e` marks multi-process, subprocess and demo runs and the slowest
in-process checks; `slow` marks tests that build full-size models. The fast subset is
`python -m pytest -q -m "not e2e and not slow" tests`.
"""
import gc
import glob
from dataclasses import replace
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
    neurons; a random non-empty subset of embedding channels (a Swin: of every stage) when `embed`,
    else all of them.

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

    full = PruneMask.full(arch)
    sizes = {c: n for c, (n, _) in full.groups().items()}  # units per block (embedding: per stage)
    heads = [subset(n, 0) for n in sizes["heads"]]
    mlp = [subset(n, 0) for n in sizes["mlp"]]
    channels = [subset(n, 1) if embed else list(range(n)) for n in sizes["embed"]]
    if empty == "all":
        empty = [(b, c) for b in range(arch.depth) for c in ("heads", "mlp")]
    for block, component in empty:
        {"heads": heads, "mlp": mlp}[component][block] = []
    mask = replace(full, heads=heads, mlp=mlp, embed=channels if arch.family == "swin" else channels[0])
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


# -- tiny runs of main.py and main_deploy.py in this process -------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CPU = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu", "--num_workers", "0"]
NO_AUGMENT = ["--aa=", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--log_period", "100"]
TINY_DEPLOY = ["--model", "deit_test_patch8_32_deploy", *DIGITS_CPU, *NO_AUGMENT, "--batch-size", "100",
               "--warmup-epochs", "0"]
TINY_PRUNE = ["--model", "deit_test_patch8_32", *DIGITS_CPU, *NO_AUGMENT, "--batch-size", "16",
              "--pruning_feed_percent", "0.06", "--need_hessian", "--finetune_op", "2",
              "--pruning_flops_percentage", "0.5"]


def call_entry(entry: str, argv, capsys) -> tuple:
    """(exit status, stderr) of `main.main` (entry 'main') or `main_deploy.main` ('deploy') called in
    this process: the same `cli_entry` path as the command line."""
    import main
    import main_deploy

    module = main if entry == "main" else main_deploy
    code = 0
    try:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """`err` is one `error: ...` line and no traceback; that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def text_logs(folder) -> str:
    """The text of every *.log file in `folder`, in name order."""
    return "".join(open(n).read() for n in sorted(glob.glob(os.path.join(str(folder), "*.log"))))


def launcher_free_env() -> dict:
    """os.environ without torchrun's variables, one thread: for a subprocess run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def quick_worker_exit(monkeypatch):
    """A DataLoader worker left by a failed test stops in 0.1 s, not 5 s.

    The error re-raised from a worker holds the loader's iterator in a reference cycle, so
    the garbage collector frees it, with its queue to the worker: the stop message never
    leaves, and torch terminates the worker after its join timeout (5 s, shortened here).
    """
    import torch.utils.data._utils as loader_utils

    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    yield
    gc.collect()


class TimedItems:
    """`n` items (`item`, or a zero tensor); fetching one advances the fake clock `clock[0]` by `step` s."""

    def __init__(self, clock: list, n: int, step: float, item=None):
        self.clock, self.n, self.step, self.item = clock, n, step, item

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            self.clock[0] += self.step
            yield self.item if self.item is not None else torch.zeros(2, 1)
