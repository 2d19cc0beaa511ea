"""Seeding every RNG a run draws from, and deriving independent seeds from integer keys."""
import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: any non-negative integer; reduced modulo 2**32 for NumPy.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*keys: int) -> int:
    """A well-mixed 31-bit seed from integer keys, e.g. `derive_seed(seed, epoch, rank)`.

    Distinct key tuples give unrelated streams (NumPy's SeedSequence hashing), so
    reseeding per epoch makes an epoch's randomness independent of what ran before it.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)
