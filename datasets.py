"""Data sets, transforms, samplers and loaders, the DeiT way.

`build_dataset(is_train, cfg)` (a `DataConfig`) gives `(dataset, num_classes)` for
IMNET (any ImageFolder tree with train/ and val/), CIFAR (CIFAR-100) and DIGITS
(scikit-learn's 8x8 handwritten digits upscaled to RGB: an offline demo set that runs
the real pipeline).
`build_loaders` picks the samplers: repeated augmentation (`RASampler`) or a
seeded shuffling sampler for training, an exact shard sampler for `--dist-eval`.
Every training sampler has `set_epoch(epoch)`: call it before each epoch.
"""
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.data import Mixup, auto_augment, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision import transforms
from torchvision.datasets import CIFAR100, ImageFolder
from torchvision.datasets.folder import default_loader

from utils import UserError, get_rank, get_world_size

SMALL_INPUT = 32  # at or below this size DeiT trains with RandomCrop(padding=4) instead of RandomResizedCrop


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is transformed and loaded (flag names in the comments).

    Args:
        data_set, data_path: `--data-set --data-path`.
        input_size: `--input-size`.
        batch_size: per process (`--batch-size`); validation batches are twice as large.
        num_workers: `--num_workers`.
        pin_memory: pin host memory (`--pin-mem` on a CUDA device).
        repeated_aug: `RASampler` for training (`--repeated-aug`).
        dist_eval: shard evaluation over the ranks (`--dist-eval`).
        seed: seed of the training samplers (`--seed`).
        color_jitter, hflip, aa, train_interpolation, reprob, remode, recount: training
            augmentation (`--color-jitter --hflip --aa --train-interpolation --reprob --remode --recount`).
        crop_pct: evaluation centre-crop fraction, None for 224/256 (`--crop_pct`).
        inception_mean_std: normalise with 0.5 (`--not_imagenet_default_mean_and_std`).
    """

    data_set: str
    data_path: str
    input_size: int
    batch_size: int
    num_workers: int
    pin_memory: bool
    repeated_aug: bool
    dist_eval: bool
    seed: int
    color_jitter: float
    hflip: float
    aa: str
    train_interpolation: str
    reprob: float
    remode: str
    recount: int
    crop_pct: Optional[float]
    inception_mean_std: bool


@dataclass(frozen=True)
class MixupConfig:
    """timm's Mixup/CutMix settings (`--mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob
    --mixup-mode`) and the label smoothing of the soft targets (`--smoothing`)."""

    mixup: float
    cutmix: float
    cutmix_minmax: Optional[Tuple[float, float]]
    prob: float
    switch_prob: float
    mode: str
    smoothing: float

    @property
    def active(self) -> bool:
        """Whether mixup or cutmix is on (DeiT's rule)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


def mean_std(inception: bool) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The input normalisation: ImageNet's statistics, or 0.5 (`--not_imagenet_default_mean_and_std`)."""
    if inception:
        return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _mean_std(cfg: DataConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    return mean_std(cfg.inception_mean_std)


def _posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's RandAugment posterize, with 0 bits kept giving a black image.

    'PosterizeIncreasing' keeps `4 - int(m / 10 * 4)` bits, i.e. 0 bits when the
    noisy magnitude of `rand-m9-mstd0.5` is clipped at 10 (about 2% of draws).
    Older Pillow turned that into an all-black image (every bit masked off), which
    is what DeiT trained with; recent Pillow (13.0 here) raises ValueError instead,
    which would stop a run within a few hundred images.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _make_posterize_safe(transform) -> None:
    """Swap `_posterize_zero_bits_black` into every RandAugment/AutoAugment posterize op of `transform`."""
    for t in getattr(transform, "transforms", []):
        ops = getattr(t, "ops", None)
        if ops is None and hasattr(t, "policy"):  # AutoAugment: a list of sub-policies
            ops = [op for sub_policy in t.policy for op in sub_policy]
        for op in ops or []:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_zero_bits_black


def build_transform(is_train: bool, cfg: DataConfig) -> Callable:
    """DeiT's transforms, from timm's `create_transform`.

    Training: RandomResizedCrop (bicubic by default), flip, colour jitter / RandAugment
    (`--aa`), normalisation and random erasing (`--reprob --remode --recount`);
    RandAugment's posterize is made safe for current Pillow (see
    `_posterize_zero_bits_black`). At input sizes <= 32 the crop is DeiT's
    `RandomCrop(size, padding=4)`, after resizing the image to the input size (a
    no-op for 32x32 images such as CIFAR).
    Evaluation: resize the short side to `input_size / crop_pct` (crop_pct 224/256
    by default) and centre-crop; at sizes <= 32 resize to the input size itself.

    Args:
        is_train: training or evaluation transform.
        cfg: input size, augmentation, crop fraction and normalisation.
    """
    size = cfg.input_size
    mean, std = _mean_std(cfg)
    if is_train:
        transform = create_transform(
            input_size=size, is_training=True, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
            auto_augment=cfg.aa or None, interpolation=cfg.train_interpolation,
            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=mean, std=std)
        _make_posterize_safe(transform)
        if size <= SMALL_INPUT:
            transform.transforms[0] = transforms.Compose([
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size, padding=4),
            ])
        return transform
    return create_transform(input_size=size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                            crop_pct=1.0 if size <= SMALL_INPUT else cfg.crop_pct)  # timm's default: 224/256


# ---------------------------------------------------------------------------
# DIGITS: scikit-learn's handwritten digits as a tiny offline image data set
# ---------------------------------------------------------------------------

DIGITS_NUM_TRAIN = 1500  # of 1797; the remaining 297 are the validation split
DIGITS_SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    return images, digits.target.astype(np.int64), order


class DigitsDataset(Dataset):
    """scikit-learn's 1797 handwritten digits (8x8 grey), as RGB PIL images of `image_size`.

    A fixed permutation (seed 0) splits them into 1500 training and 297 validation
    images, the same on every call and machine. Items are `(transform(img), label)`.

    Args:
        train: the training or the validation split.
        image_size: side of the upscaled (bilinear) square image.
        transform: applied to the PIL image; None returns the PIL image.
    """

    num_classes = 10

    def __init__(self, train: bool, image_size: int, transform: Optional[Callable] = None):
        images, labels, order = _digits_arrays()
        self.indices = order[:DIGITS_NUM_TRAIN] if train else order[DIGITS_NUM_TRAIN:]
        self.images, self.labels = images, labels
        self.image_size = image_size
        self.transform = transform
        self.targets = [int(labels[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        k = self.indices[index]
        img = Image.fromarray(self.images[k], mode="L")
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[k])


# ---------------------------------------------------------------------------
# ImageFolder (IMNET), CIFAR-100
# ---------------------------------------------------------------------------

def _class_folders(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise UserError(f"folder {root!r} not found (--data-set IMNET expects train/ and val/ folders with one "
                        f"sub-folder per class)", field="data_path")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"folder {root!r} has no class sub-folders", field="data_path")
    return classes


class ImageLoader:
    """torchvision's image loader, turning an unreadable image into a `UserError` that names it.

    A corrupt or truncated file otherwise stops a run with a PIL traceback (from a
    DataLoader worker, wrapped in a second one). Picklable, for spawned workers.

    Args:
        what: where the images are met, e.g. "training set" (part of the message).
    """

    def __init__(self, what: str):
        self.what = what

    def __call__(self, path: str):
        try:
            img = default_loader(path)
        except UnidentifiedImageError:
            reason = "not an image format PIL can identify"
        except (OSError, SyntaxError, ValueError) as err:  # e.g. "image file is truncated"
            reason = " ".join(str(err).split()) or type(err).__name__
        else:
            return img
        raise UserError(f"cannot read image {path!r} of the {self.what} ({reason}); expected a readable image "
                        f"file (remove or replace it)", field="data_path")


def _image_folder(data_path: str, is_train: bool, transform: Callable, what: str):
    if not data_path:
        raise UserError("required for --data-set IMNET (a folder with train/ and val/)", field="data_path")
    train_classes = _class_folders(os.path.join(data_path, "train"))
    root = os.path.join(data_path, "train" if is_train else "val")
    if not is_train:
        val_classes = _class_folders(root)
        if val_classes != train_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise UserError(f"the class folders of {root!r} differ from those of train/ (only in train: "
                            f"{only_train}, only in val: {only_val})", field="data_path")
    try:
        dataset = ImageFolder(root, transform=transform, loader=ImageLoader(what))
    except FileNotFoundError as err:
        raise UserError(f"no images in {root!r} ({err})", field="data_path") from None
    if len(dataset) == 0:
        raise UserError(f"no images in {root!r}", field="data_path")
    return dataset, len(train_classes)


def _cifar100(data_path: str, is_train: bool, transform: Callable):
    if not data_path:
        raise UserError("required for --data-set CIFAR (the folder holding cifar-100-python/)", field="data_path")
    try:
        return CIFAR100(data_path, train=is_train, transform=transform, download=False), 100
    except RuntimeError:
        raise UserError(f"no CIFAR-100 in {data_path!r} (--data-set CIFAR expects {data_path}/cifar-100-python/; "
                        f"nothing is downloaded)", field="data_path") from None


def build_dataset(is_train: bool, cfg: DataConfig, what: Optional[str] = None,
                  augment: Optional[bool] = None) -> Tuple[Dataset, int]:
    """The training or validation set named by `--data-set`, with DeiT's transforms.

    Args:
        is_train: training split (with training transforms) or validation split.
        cfg: the data set, its path and the transforms' settings.
        what: how an unreadable image's error names the set (default "training set" /
            "validation set").
        augment: training transforms (default: `is_train`); False gives the training split with
            the evaluation transform (compensation's calibration images).

    Returns:
        `(dataset, num_classes)`; for IMNET the class count is that of train/.

    Raises:
        UserError: missing or empty folders or files, naming them (and, when read, an
            unreadable image).
    """
    transform = build_transform(is_train if augment is None else augment, cfg)
    what = what or ("training set" if is_train else "validation set")
    name = cfg.data_set
    if name == "IMNET":
        return _image_folder(cfg.data_path, is_train, transform, what)
    if name == "CIFAR":
        return _cifar100(cfg.data_path, is_train, transform)
    if name == "DIGITS":
        return DigitsDataset(train=is_train, image_size=cfg.input_size, transform=transform), 10
    raise UserError(f"{name!r} is not one of IMNET, CIFAR, DIGITS", field="data_set")


# ---------------------------------------------------------------------------
# Samplers and loaders
# ---------------------------------------------------------------------------

class RASampler(RepeatAugSampler):
    """timm's repeated-augmentation sampler (DeiT's RASampler), its shuffle seeded by `seed + epoch`.

    Each index is repeated `num_repeats` times in a row and dealt round-robin, so the
    copies of one image land on different ranks; a rank keeps
    `len(dataset) // 256 * 256 / num_replicas` indices, or `ceil(len(dataset) / num_replicas)`
    for data sets under 256 images. timm seeds with the epoch alone; `seed` adds `--seed`.
    """

    def __init__(self, dataset: Sequence, num_replicas: int, rank: int, seed: int = 0, **kwargs):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.seed + epoch


class ShardSampler(Sampler):
    """Rank r takes indices r, r + R, r + 2R, ... in order, without padding.

    For distributed evaluation: unlike `DistributedSampler` no sample is counted
    twice, so metrics summed over ranks are exact for any data set size.
    """

    def __init__(self, dataset: Sequence, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.dataset_len = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # same shards every epoch
        pass


def build_loaders(cfg: DataConfig, dataset_train: Optional[Dataset], dataset_val: Optional[Dataset],
                  distributed: bool) -> Tuple[Optional[DataLoader], Optional[DataLoader]]:
    """Training and validation loaders (either set may be None, giving None).

    Training sampler: `RASampler` with `--repeated-aug` (also with one process, as
    the SAViT reference does), otherwise a `DistributedSampler` over the ranks
    (with one process: a shuffle seeded by `--seed` + epoch). Both need
    `loader.sampler.set_epoch(epoch)` before each epoch. Batches of `--batch-size`,
    last partial batch dropped (DeiT). Validation: `ShardSampler` with
    `--dist-eval` in a distributed run, otherwise every rank reads the whole set in
    order; batches of 2 x `--batch-size` (the reference's choice).

    Args:
        cfg: batch size, workers, pinning, samplers and their seed.
        dataset_train: training set or None.
        dataset_val: validation set or None.
        distributed: shard over `get_world_size()` ranks.

    Raises:
        UserError: a rank would get no full training batch.
    """
    world, rank = (get_world_size(), get_rank()) if distributed else (1, 0)
    pin = cfg.pin_memory
    loader_train = loader_val = None
    if dataset_train is not None:
        if cfg.repeated_aug:
            sampler_train = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        else:
            sampler_train = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                               seed=cfg.seed)
        if len(sampler_train) < cfg.batch_size:
            raise UserError(f"{cfg.batch_size} is larger than the {len(sampler_train)} training samples each of "
                            f"the {world} process(es) gets per epoch ({len(dataset_train)} images); lower it",
                            field="batch_size")
        loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, pin_memory=pin, drop_last=True)
    if dataset_val is not None:
        if distributed and cfg.dist_eval:
            sampler_val = ShardSampler(dataset_val, num_replicas=world, rank=rank)
        else:
            sampler_val = SequentialSampler(dataset_val)
        loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=2 * cfg.batch_size,
                                num_workers=cfg.num_workers, pin_memory=pin, drop_last=False)
    return loader_train, loader_val


def build_mixup(cfg: MixupConfig, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix with label smoothing, or None when both are off (DeiT's rule).

    Args:
        cfg: the mixup/cutmix settings and the label smoothing.
        num_classes: classes of the data set (for the soft targets).
    """
    if not cfg.active:
        return None
    minmax = list(cfg.cutmix_minmax) if cfg.cutmix_minmax is not None else None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=minmax, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)
