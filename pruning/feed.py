"""The batches that feed the pruning pass: the same ones for any number of processes.

The pass takes `max(1, int(pruning_feed_percent * (N // batch_size)))` batches of a
permutation of the training set fixed by `--seed`; with W processes, rank r scores
global batches r, r + W, r + 2W, ... Every sample's augmentation is seeded by
(seed, sample index) and every batch's mixup by (seed, batch index), so a sample
looks the same whichever process or data-loader worker prepares it: a W-process
pass sums exactly the terms of the 1-process pass.

(The reference takes `int(feed_percent * len(loader))` batches per process of its
distributed loader: about the same number in total, but not the same batches.)
"""
import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils import UserError, derive_seed


class SeededSamples(Dataset):
    """`dataset[i]` with Python, NumPy and torch RNGs seeded from (seed, i) first."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = derive_seed(self.seed, index)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return self.dataset[index]


def num_feed_batches(dataset_size: int, batch_size: int, feed_percent: float) -> int:
    """Global number of batches of the pass (at least 1; the reference crashes on 0)."""
    full = dataset_size // batch_size
    if full < 1:
        raise UserError(f"{batch_size} is larger than the training set ({dataset_size} images)", field="batch_size")
    return max(1, int(feed_percent * full))


def feed_batches(dataset: Dataset, batch_size: int, feed_percent: float, seed: int, rank: int = 0,
                 world_size: int = 1, mixup_fn: Optional[Callable] = None, num_workers: int = 0,
                 pin_memory: bool = False, count: Optional[int] = None) -> Tuple[Iterator, int, int]:
    """This rank's share of the pruning-pass batches.

    Args:
        dataset: the training set (training transforms).
        batch_size: images per batch.
        feed_percent: `--pruning_feed_percent`, fraction of the full batches to use.
        seed: `--seed`: fixes the permutation, the augmentations and mixup.
        rank: this process's rank.
        world_size: number of processes.
        mixup_fn: timm `Mixup` or None.
        num_workers: data-loading workers.
        pin_memory: pin host memory.
        count: the first `count` global batches of the permutation instead of `feed_percent` of them.

    Returns:
        (iterator of (images, targets), number of batches of this rank, total number of batches).
    """
    total = (num_feed_batches(len(dataset), batch_size, feed_percent) if count is None
             else min(count, num_feed_batches(len(dataset), batch_size, 1.0)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    mine = list(range(rank, total, world_size))
    batch_indices: List[List[int]] = [order[k * batch_size:(k + 1) * batch_size] for k in mine]
    loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=batch_indices, num_workers=num_workers,
                        pin_memory=pin_memory)

    def batches():
        for k, (images, targets) in zip(mine, loader):
            if mixup_fn is not None:
                np.random.seed(derive_seed(seed, k, 1))  # timm's Mixup draws from NumPy's global RNG
                images, targets = mixup_fn(images, targets)
            yield images, targets

    return batches(), len(mine), total
