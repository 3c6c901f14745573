"""Loaders on real and small generated data: digits, IDX files, an ImageFolder of PNGs."""
from __future__ import annotations

import argparse
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mergemix import data
from mergemix.config import build_train_parser
from mergemix.errors import DataError


def args_for(**overrides) -> argparse.Namespace:
    args = build_train_parser().parse_args([])
    vars(args).update(overrides)
    return args


def write_idx(path, array: np.ndarray, gz: bool = True, cut: int = 0) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = (header + array.astype(np.uint8).tobytes())[: -cut or None]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fashion(folder, n_train=40, n_test=20, seed=0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_digits_split_is_fixed_stratified_and_in_memory():
    a, b = data.load_digits(None), data.load_digits(None)
    assert (len(a.train), len(a.eval), a.num_classes, a.img_size, a.in_chans) == (1437, 360, 10, 16, 1)
    assert torch.equal(a.eval.labels, b.eval.labels) and torch.equal(a.eval.images, b.eval.images)
    assert torch.bincount(a.eval.labels).min() >= 35  # every class held out in proportion
    x, y = a.train[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    assert data.load_digits(8).train[0][0].shape == (1, 8, 8)  # the native size on request


def byte_stats(values, scale: float) -> tuple[float, float]:
    """Mean and standard deviation (n - 1 in the denominator, as torch's) of small non-negative integers
    / ``scale``, exactly in float64 from their histogram."""
    counts = np.bincount(np.frombuffer(values, np.uint8) if isinstance(values, bytes) else np.asarray(values).ravel())
    v, n = np.arange(len(counts)) / scale, counts.sum()
    mean = (counts * v).sum() / n
    return float(mean), float(np.sqrt((counts * (v - mean) ** 2).sum() / (n - 1)))


def test_digits_normalise_with_the_statistics_of_their_training_split():
    """sklearn's digits (0..16 per pixel) / 16, over the fixed split the module documents (stratified
    80/20, seed 0): the training images' mean and std, at the native 8x8 where no resizing blurs them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, _, y_te = train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=0)
    mean, std = byte_stats(x_tr.astype(np.int64), 16)
    assert (mean, std) != pytest.approx(byte_stats(d.images.astype(np.int64), 16), rel=1e-4)  # the split matters
    bundle = data.load_digits(8)
    assert bundle.mean[0] == pytest.approx(mean, rel=1e-6) and bundle.std[0] == pytest.approx(std, rel=1e-6)
    x, y = bundle.eval[5]  # the evaluation images are normalised with the training statistics too
    assert y == y_te[5]
    expected = (torch.tensor(x_te[5], dtype=torch.float64) / 16 - mean) / std
    assert torch.allclose(x[0].double(), expected, atol=1e-5)


@pytest.mark.skipif(not data.FASHION_SYSTEM_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_normalises_with_the_statistics_of_its_training_bytes():
    """The 60000 training images' bytes / 255, counted here from the installed file (published: mean
    0.2860, std 0.3530)."""
    bundle = data.build(args_for(dataset="fashion-mnist"))
    path = data._find_idx(data.FASHION_SYSTEM_DIR, "train-images-idx3-ubyte")
    raw = path.read_bytes()
    mean, std = byte_stats((gzip.decompress(raw) if path.suffix == ".gz" else raw)[16:], 255)
    assert (round(mean, 4), round(std, 4)) == (0.2860, 0.3530)
    assert bundle.mean[0] == pytest.approx(mean, rel=1e-5) and bundle.std[0] == pytest.approx(std, rel=1e-5)


def bright_pixel(x: torch.Tensor, mean: float, std: float) -> tuple[int, int]:
    """(row, column) of the one pixel of value 1 in a normalised (1, H, W) image whose others are 0."""
    pixels = x[0].double() * std + mean
    on = (pixels > 0.5).nonzero().tolist()
    assert len(on) == 1 and torch.allclose(pixels, (pixels > 0.5).double(), atol=1e-6), pixels
    return tuple(on[0])


@pytest.mark.parametrize("flip", [False, True])
def test_training_images_shift_by_up_to_pad_and_flip_half_the_time(flip):
    """One bright pixel at row 2, column 1 of a 5x7 image, pad 1: each draw moves it by one of the 9
    shifts within +-1 (every one of them, each about a ninth of the time), and with ``flip`` about half
    the draws are mirrored, putting it in columns 4..6, which no shift alone reaches."""
    image = torch.zeros(1, 1, 5, 7)
    image[0, 0, 2, 1] = 1.0
    mean, std = 0.25, 0.5
    ds = data.TensorImages(image, torch.tensor([3]), mean, std, pad=1, flip=flip)
    torch.manual_seed(0)
    n = 1800
    shifts, mirrored = [], 0
    for _ in range(n):
        x, y = ds[0]
        assert x.shape == (1, 5, 7) and y == 3
        row, col = bright_pixel(x, mean, std)
        if col >= 4:  # mirrored: column c of the shifted image lands at 6 - c
            mirrored += 1
            col = 6 - col
        shifts.append((row - 2, col - 1))
    nine = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert set(shifts) == nine
    se = (n * (1 / 9) * (8 / 9)) ** 0.5
    assert all(abs(shifts.count(s) - n / 9) < 5 * se for s in nine), {s: shifts.count(s) for s in nine}
    if flip:
        assert abs(mirrored - n / 2) < 5 * (n / 4) ** 0.5, mirrored
    else:
        assert mirrored == 0


def test_only_the_training_split_is_augmented(tmp_path):
    """Fashion-MNIST files of one bright pixel (row 10, column 5 of 28x28): the training set shifts it
    by up to 2 pixels and mirrors it; the evaluation set serves it where it is, every time."""
    dot = np.zeros((4, 28, 28))
    dot[:, 10, 5] = 255
    for stem in ("train", "t10k"):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", dot)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(4))
    bundle = data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    mean, std = bundle.mean[0], bundle.std[0]
    torch.manual_seed(0)
    assert {bright_pixel(bundle.eval[1][0], mean, std) for _ in range(50)} == {(10, 5)}
    seen = {bright_pixel(bundle.train[1][0], mean, std) for _ in range(600)}
    unflipped = {(10 + dy, 5 + dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert seen == unflipped | {(r, 27 - c) for r, c in unflipped}


def test_fashion_idx_files_from_data_dir(tmp_path):
    write_fashion(tmp_path)
    bundle = data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    assert (len(bundle.train), len(bundle.eval), bundle.num_classes, bundle.in_chans) == (40, 20, 10, 1)
    x, y = bundle.eval[3]
    assert x.shape == (1, 28, 28) and y == 3
    # normalised with the statistics of the training images' bytes / 255, computed here from the file
    mean, std = byte_stats(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[16:], 255)
    assert bundle.mean[0] == pytest.approx(mean, rel=1e-6) and bundle.std[0] == pytest.approx(std, rel=1e-6)
    raw = np.frombuffer(gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    expected = (torch.tensor(raw[3 * 784:4 * 784], dtype=torch.float64).view(1, 28, 28) / 255 - mean) / std
    assert torch.allclose(x.double(), expected, atol=1e-5)


def test_fashion_torchvision_layout_and_uncompressed(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion(raw)
    for f in raw.glob("*.gz"):  # torchvision keeps the decompressed files too
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    assert len(data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path))).train) == 40


def test_fashion_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    write_fashion(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"not found in .*: train-labels-idx1-ubyte \(\.gz or not\) missing; all four"):
        data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    write_fashion(tmp_path)
    write_idx(images, np.zeros((40, 28, 28)), cut=100)
    with pytest.raises(DataError, match="truncated"):
        data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    images.write_bytes(gzip.compress(np.zeros((40, 28, 28), np.uint8).tobytes())[:-30])  # cut gzip stream
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))
    images.write_bytes(gzip.compress(b"\x01\x02\x03\x04" * 10))
    with pytest.raises(DataError, match="not an IDX file"):
        data.build(args_for(dataset="fashion-mnist", data_dir=str(tmp_path)))


def make_imagefolder(root, classes=("cat", "dog"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_of_pngs(tmp_path):
    make_imagefolder(tmp_path)
    bundle = data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16, aa="rand-m7-mstd0.5-inc1",
                                 reprob=0.25))
    assert (len(bundle.train), len(bundle.eval), bundle.num_classes, bundle.in_chans) == (6, 6, 2, 3)
    assert bundle.train[0][0].shape == bundle.eval[5][0].shape == (3, 16, 16)
    assert bundle.eval[5][1] == 1


def test_rgb_augmentation_flags_timm_refuses_are_one_line_and_grey_sets_note_theirs_ignored(tmp_path):
    from mergemix.config import parse_train_args
    from mergemix.errors import ConfigError

    make_imagefolder(tmp_path)
    with pytest.raises(ConfigError, match="--aa bogus: timm cannot build this augmentation"):
        data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16, aa="bogus"))
    for flag in ("--remode", "--interpolation"):  # timm's own errors were an AssertionError and a KeyError
        with pytest.raises(ConfigError, match=f"argument {flag}: invalid choice: 'bogus'"):
            parse_train_args([flag, "bogus"])
    defaults = build_train_parser().parse_args([])
    grey = parse_train_args(["--aa", "rand-m7", "--reprob", "0.5", "--interpolation", "bilinear"])
    assert data.ignored_augmentation(grey, defaults) == ["--aa rand-m7", "--reprob 0.5", "--interpolation bilinear"]
    assert data.ignored_augmentation(parse_train_args(["--dataset", "cifar10", "--aa", "rand-m7"]), defaults) == []


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no val or validation or test/ folder"):
        data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path)))
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="class folder"):
        data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path)))


@pytest.mark.parametrize("dataset", ["imagefolder", "fashion-mnist", "cifar10"])
def test_a_data_dir_that_is_a_file_is_named_so(tmp_path, dataset):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(DataError, match=f"data directory {afile} is a file, not a directory"):
        data.build(args_for(dataset=dataset, data_dir=str(afile)))


def test_corrupt_image_names_the_file(tmp_path):
    make_imagefolder(tmp_path)
    bad = tmp_path / "val" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    bundle = data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16))
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        bundle.eval[4]


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar100 not found"):
        data.build(args_for(dataset="cifar100", data_dir=str(tmp_path)))


def test_train_subset_and_sampler_skip():
    bundle = data.build(args_for(train_subset=100))
    assert len(bundle.train) == 100
    # the benchmarks compare methods and seeds on one subset: it must depend on neither
    other = data.build(args_for(train_subset=100, seed=7, mix="cutmix"))
    assert other.train.indices == bundle.train.indices
    loader = data.train_loader(bundle, 10, 0, 0, 1, seed=1, device=torch.device("cpu"))
    loader.sampler.set_epoch(3)
    full = [y.tolist() for _, y in loader]
    loader.sampler.set_epoch(3)
    loader.sampler.skip = 40
    assert [y.tolist() for _, y in loader] == full[4:]
    assert len(loader) == 10  # skip applies to one pass only
    with pytest.raises(DataError, match="--train-subset 0 must be between 1 and the 1437"):
        data.build(args_for(train_subset=0))  # 0 is not "unset"


def test_imagefolder_skips_hidden_files_and_folders(tmp_path):
    """macOS's AppleDouble ._x.png next to each image and a .ipynb_checkpoints folder are no data."""
    make_imagefolder(tmp_path)
    for split in ("train", "val"):
        (tmp_path / split / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / split / ".ipynb_checkpoints" / "x.png")
    bundle = data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16))
    assert (len(bundle.train), len(bundle.eval), bundle.classes) == (6, 6, ("cat", "dog"))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gradient = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    rgb = np.asarray(data.read_image(str(tmp_path / "g16.png")))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], (gradient >> 8).astype(np.uint8))
    assert len(np.unique(rgb)) == 256  # PIL's own convert("RGB") leaves only 0 and 255
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="float pixels"):
        data.read_image(str(tmp_path / "f.tif"))


def test_imagefolder_class_mismatch_names_the_classes(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "zebra")
    with pytest.raises(DataError, match="dog, zebra in one only"):
        data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16))


def test_evaluating_leaves_the_global_rng_alone():
    """A DataLoader without a generator seeds each of its iterators from the global RNG, which
    training's dropout and drop-path draw from: evaluating (or evaluating the EMA too) would shift
    the rest of the run. The evaluation loader brings its own."""
    bundle = data.build(args_for(train_subset=40))
    loader = data.eval_loader(bundle, 64, 0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert sum(len(y) for _, y in loader) == len(bundle.eval)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cpus, expected", [(2, 2), (16, 4)])
def test_default_workers_decode_files_on_at_most_the_cpus_there_are(cpus, expected, monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    files = data.DataBundle(None, [], 2, 16, 3, (0.5,), (0.5,), in_memory=False)
    assert data.loader_workers(files, None) == expected
    assert data.loader_workers(files, 7) == 7  # --workers as given
    assert data.loader_workers(data.DataBundle(None, [], 2, 16, 3, (0.5,), (0.5,), in_memory=True), None) == 0


def test_every_dataset_the_flags_offer_has_a_loader():
    """config lists --dataset's choices by hand (it imports no torch): they must not drift from data's."""
    from mergemix import config

    assert set(data.LOADERS) == set(config.DATASETS) and set(data.GREY_DATASETS) <= set(config.DATASETS)


def test_the_training_order_is_shuffled_and_changes_with_the_epoch():
    """Labels 0..n-1 on n blank images, so a batch's labels are the indices the sampler drew: an
    epoch's order is a permutation of every index (none dropped, one process, n a multiple of the
    batch), not 0..n-1 in turn, and epochs 0 and 1 draw different permutations of the same indices."""
    n = 40
    bundle = data.DataBundle(data.TensorImages(torch.zeros(n, 1, 4, 4), torch.arange(n), 0.0, 1.0),
                             data.TensorImages(torch.zeros(4, 1, 4, 4), torch.arange(4), 0.0, 1.0),
                             num_classes=n, img_size=4, in_chans=1, mean=(0.0,), std=(1.0,), in_memory=True)
    loader = data.train_loader(bundle, 8, 0, 0, 1, seed=0, device=torch.device("cpu"))
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        orders.append([i for _, y in loader for i in y.tolist()])
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert orders[0] != list(range(n)) and orders[1] != list(range(n))
    assert orders[0] != orders[1]


def test_imagefolder_augments_the_training_split_only(tmp_path):
    """timm's training transform crops a random region and flips at random, its evaluation transform
    takes a fixed centre crop: drawn three times (under three torch seeds) an evaluation image comes back as the
    same tensor, a training image (the same file) does not."""
    make_imagefolder(tmp_path, per_class=1, size=20)
    bundle = data.build(args_for(dataset="imagefolder", data_dir=str(tmp_path), img_size=16))
    draws = {}
    for split in ("train", "eval"):
        images = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            images.append(getattr(bundle, split)[0][0])
        draws[split] = images
    assert all(torch.equal(draws["eval"][0], x) for x in draws["eval"][1:])
    assert not all(torch.equal(draws["train"][0], x) for x in draws["train"][1:])


def test_rand_augment_at_full_magnitude_runs_with_the_installed_pillow():
    """timm's RandAugment (the DeiT recipe's rand-m9-mstd0.5-inc1 reaches magnitude 10 through its noise)
    posterizes to 0 bits there, which Pillow 13 refuses: the ImageNet recipe crashed in its first steps."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    image = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert np.asarray(out).max() == 0  # 0 bits kept: black, as timm means it
