"""Data sets, transforms, samplers and loaders: shapes, class counts, determinism, errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, SequentialSampler

import args as flags
from datasets import (DigitsDataset, RASampler, ShardSampler, build_dataset, build_loaders, build_mixup,
                      build_transform)
from utils import UserError


def _parse(argv):
    import main_deploy  # the parser with every data, augmentation and mixup flag

    return main_deploy.get_args_parser().parse_args(["--device", "cpu", "--num_workers", "0", "--input-size", "224",
                                                     *argv])


def make_args(*argv):
    """The `DataConfig` of these flags."""
    return flags.data_config(_parse(argv))


def make_mixup(*argv):
    """The `MixupConfig` of these flags."""
    return flags.mixup_config(_parse(argv))


def make_image_folder(root, classes=("ant", "bee", "cat"), per_class=2, size=(20, 24), splits=("train", "val")):
    rng = np.random.RandomState(0)
    for split in splits:
        for name in classes:
            os.makedirs(root / split / name, exist_ok=True)
            for k in range(per_class):
                pixels = rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


# ---------------------------------------------------------------- DIGITS

def test_digits_split_sizes_classes_and_labels():
    from sklearn.datasets import load_digits

    ns = make_args("--data-set", "DIGITS", "--input-size", "32")
    train, n_train = build_dataset(True, ns)
    val, n_val = build_dataset(False, ns)
    assert (len(train), len(val), n_train, n_val) == (1500, 297, 10, 10)
    assert sorted(set(train.indices) | set(val.indices)) == list(range(1797))  # disjoint and complete
    digits = load_digits()
    assert train.targets == digits.target[train.indices].tolist()
    assert set(val.targets) == set(range(10))
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == digits.target[val.indices[0]]


def test_digits_images_are_upscaled_digits_and_deterministic():
    from sklearn.datasets import load_digits

    raw = DigitsDataset(train=False, image_size=64)
    img, label = raw[5]
    assert img.mode == "RGB" and img.size == (64, 64)
    grey = np.asarray(img)[:, :, 0].astype(np.float64)
    assert np.array_equal(grey, np.asarray(img)[:, :, 1])  # grey replicated over channels
    # averaging 8x8 blocks of the upscaled image gives back the 8x8 digit (0..16 -> 0..255), roughly
    blocks = grey.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    original = load_digits().images[raw.indices[5]] * 255 / 16
    assert np.corrcoef(blocks.ravel(), original.ravel())[0, 1] > 0.95
    ns = make_args("--data-set", "DIGITS", "--input-size", "32")
    a, b = build_dataset(False, ns)[0], build_dataset(False, ns)[0]
    assert np.array_equal(a.indices, b.indices)
    assert torch.equal(a[3][0], b[3][0])  # eval transform: no randomness


def test_digits_ignores_data_path():
    ns = make_args("--data-set", "DIGITS", "--input-size", "32", "--data-path", "/nonexistent")
    assert len(build_dataset(True, ns)[0]) == 1500


# ---------------------------------------------------------------- ImageFolder

@pytest.mark.parametrize("input_size", [32, 48])
def test_image_folder_loads_with_class_count(tmp_path, input_size):
    root = make_image_folder(tmp_path / "data")
    ns = make_args("--data-path", str(root), "--input-size", str(input_size))
    train, n_classes = build_dataset(True, ns)
    val, _ = build_dataset(False, ns)
    assert n_classes == 3 and len(train) == 6 and len(val) == 6
    assert train.classes == ["ant", "bee", "cat"] and val.class_to_idx == train.class_to_idx
    for dataset in (train, val):
        image, label = dataset[5]
        assert image.shape == (3, input_size, input_size) and label == 2


def test_empty_or_missing_folders_are_user_errors(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "ant").mkdir(parents=True)
    make_image_folder(tmp_path / "noval", splits=("train",))
    root = make_image_folder(tmp_path / "diff")
    os.rename(root / "val" / "cat", root / "val" / "cow")
    for is_train, path, words in ((True, tmp_path / "nowhere", "nowhere"),
                                  (True, tmp_path / "empty", "no class sub-folders"),
                                  (True, tmp_path / "noimg", "no images in .*noimg"),
                                  (False, tmp_path / "noval", "noval.*val"),
                                  (False, root, "differ"),
                                  (True, "", "required for --data-set IMNET")):
        with pytest.raises(UserError, match=words) as err:
            build_dataset(is_train, make_args("--data-path", str(path)))
        assert err.value.field == "data_path"


def test_cifar_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="CIFAR-100") as err:
        build_dataset(True, make_args("--data-set", "CIFAR", "--data-path", str(tmp_path)))
    assert err.value.field == "data_path"


# ---------------------------------------------------------------- transforms

def test_transforms_follow_deit():
    from torchvision import transforms as T

    big = make_args("--input-size", "224")
    eval_tf = build_transform(False, big)
    assert isinstance(eval_tf.transforms[0], T.Resize) and eval_tf.transforms[0].size == 256
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert eval_tf(image).shape == (3, 224, 224)
    small_eval = build_transform(False, make_args("--input-size", "32"))
    assert small_eval.transforms[0].size == 32  # small inputs: resized to the input size, not 32 / crop_pct
    train_tf = build_transform(True, big)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and "RandomErasing" in names
    small = build_transform(True, make_args("--input-size", "32"))
    assert isinstance(small.transforms[0].transforms[1], T.RandomCrop)  # DeiT's small-image crop
    assert small.transforms[0].transforms[1].padding == 4


def test_randaugment_posterize_at_full_magnitude_gives_black_not_an_error():
    """rand-m9-mstd0.5 clips some magnitudes at 10: 0 bits kept, which current Pillow rejects."""
    train_tf = build_transform(True, make_args("--input-size", "32"))
    rand_augment = next(t for t in train_tf.transforms if type(t).__name__ == "RandAugment")
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0  # as older Pillow: every bit masked off
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits kept: 200 -> 192
    assert np.asarray(op(image)).max() == 192


# ---------------------------------------------------------------- samplers

def test_ra_sampler_deals_repeats_across_two_ranks():
    """DeiT: each index repeated 3x in a row, dealt round-robin; a rank keeps len//256*256/R of them."""
    n = 600
    ranks = [RASampler(range(n), num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    assert [len(s) for s in ranks] == [256, 256]  # 600 // 256 * 256 / 2
    assert list(ranks[0]) == [(2 * k) // 3 for k in range(256)]
    assert list(ranks[1]) == [(2 * k + 1) // 3 for k in range(256)]
    # shuffled: the same deal applied to torch.randperm(n) seeded with the epoch (DeiT's seed 0 + epoch)
    for epoch in (0, 4):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
        for r in range(2):
            sampler = RASampler(range(n), num_replicas=2, rank=r)
            sampler.set_epoch(epoch)
            assert list(sampler) == [perm[(2 * k + r) // 3] for k in range(256)]
    a, b = RASampler(range(n), 2, 0), RASampler(range(n), 2, 0)
    b.set_epoch(1)
    assert list(a) != list(b)
    seeded = RASampler(range(n), 2, 0, seed=3)  # --seed shifts the shuffle: seed 3 + epoch 1 = epoch 4
    seeded.set_epoch(1)
    four = RASampler(range(n), 2, 0)
    four.set_epoch(4)
    assert list(seeded) == list(four)


def test_ra_sampler_small_sets_and_padding():
    # under 256 images the 256-rounding would leave nothing: keep ceil(n / R) per rank
    ranks = [RASampler(range(7), num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    assert [len(s) for s in ranks] == [4, 4]
    assert list(ranks[0]) == [0, 0, 1, 2] and list(ranks[1]) == [0, 1, 1, 2]
    assert (ranks[0].num_samples, ranks[0].total_size) == (11, 22)  # 21 repeats padded by wrapping
    rounded = RASampler(range(7), num_replicas=2, rank=0, shuffle=False, selected_round=2)
    assert len(rounded) == 3  # 7 // 2 * 2 / 2
    single = RASampler(range(10), num_replicas=1, rank=0, seed=3)
    assert len(single) == 10 and len(set(single)) <= 4  # one process: 10 of 30 repeats, ~4 images


def test_shard_sampler_covers_each_index_once():
    shards = [list(ShardSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == list(range(7))


def test_build_loaders_samplers_and_batches():
    ns = make_args("--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16")
    train, _ = build_dataset(True, ns)
    val, _ = build_dataset(False, ns)
    loader_train, loader_val = build_loaders(ns, train, val, distributed=False)
    assert isinstance(loader_train.sampler, RASampler) and len(loader_train) == 1280 // 16
    assert loader_train.drop_last and not loader_train.pin_memory
    assert isinstance(loader_val.sampler, SequentialSampler) and loader_val.batch_size == 32
    images, labels = next(iter(loader_train))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    no_ra = make_args("--data-set", "DIGITS", "--no-repeated-aug", "--batch-size", "16", "--seed", "5")
    loader_train, _ = build_loaders(no_ra, train, None, distributed=False)
    sampler = loader_train.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 1 and sampler.seed == 5
    assert len(loader_train) == 1500 // 16
    with pytest.raises(UserError, match="2000 is larger than") as err:
        build_loaders(make_args("--batch-size", "2000"), train, None, distributed=False)
    assert err.value.field == "batch_size"


def test_build_mixup_follows_flags():
    assert build_mixup(make_mixup("--mixup", "0", "--cutmix", "0"), 10) is None
    mixup = build_mixup(make_mixup(), 10)
    assert mixup.mixup_alpha == 0.8 and mixup.cutmix_alpha == 1.0 and mixup.label_smoothing == 0.1
    x = torch.randn(4, 3, 8, 8)
    _, soft = mixup(x, torch.tensor([0, 1, 2, 3]))
    assert soft.shape == (4, 10) and torch.allclose(soft.sum(1), torch.ones(4))
