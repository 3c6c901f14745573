"""Data sets and loaders.

- ``digits``: scikit-learn's 8x8 digits, a fixed stratified 80/20 split (seed 0), held in memory.
- ``fashion-mnist``: the four IDX files (``.gz`` or not), read here, held in memory; test set for evaluation.
- ``cifar10`` / ``cifar100``: torchvision, with timm's ``create_transform`` (RandAugment, erasing).
- ``imagefolder``: ``<data-dir>/train/<class>/*`` and ``<data-dir>/val/<class>/*`` (or ``validation``,
  ``test``), timm transforms; evaluation reads the latter alone.

Grey in-memory sets get a simple pipeline: random crop with zero padding (and horizontal flips for
Fashion-MNIST; not for digits), then normalisation.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .distributed import process_seed
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from PIL import Image

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = 10
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DataBundle:
    """Train and evaluation sets and what the model needs to know about them."""

    train: Dataset | None  # None where only the evaluation split was read
    eval: Dataset
    num_classes: int
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool
    classes: tuple[str, ...] | None = None  # class names by index, where the data names them (image folders)


class TensorImages(Dataset):
    """Images held as one float tensor (N, C, H, W) in [0, 1], with labels (N,).

    Training sets shift each image by up to ``pad`` pixels (random crop of the zero-padded image)
    and, with ``flip``, mirror it half the time; every image is then normalised.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: float, std: float, pad: int = 0, flip: bool = False):
        self.images, self.labels = images, labels
        self.mean, self.std, self.pad, self.flip = mean, std, pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """The (C, H, W) image ``i``, padded, cropped and flipped at random if so built, normalised; its label."""
        x = self.images[i]
        if self.pad:
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, dy:dy + h, dx:dx + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _grey_bundle(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], img_size: int | None,
                 pad: int, flip: bool) -> DataBundle:
    """Two (images (N, H, W) in [0, 1], labels) pairs -> in-memory bundle, normalised with train statistics."""
    size = img_size or train[0].shape[-1]
    xs = [_resize(x[:, None].float(), size) for x in (train[0], test[0])]
    mean, std = float(xs[0].mean()), float(xs[0].std())
    pad = max(1, round(pad * size / train[0].shape[-1]))
    return DataBundle(
        train=TensorImages(xs[0], train[1], mean, std, pad=pad, flip=flip),
        eval=TensorImages(xs[1], test[1], mean, std),
        num_classes=int(max(train[1].max(), test[1].max())) + 1, img_size=size, in_chans=1, mean=(mean,),
        std=(std,), in_memory=True)


DIGITS_SIZE = 16  # 8x8 digits upsampled x2: with 4x4 patches a 4x4 grid of 16 tokens for MergeMix to merge


def load_digits(img_size: int | None) -> DataBundle:
    """scikit-learn digits, fixed stratified 80/20 split (1437 / 360), served at 16x16 by default."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=0)
    as_t = lambda x, y: (torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long))  # noqa: E731
    return _grey_bundle(as_t(x_tr, y_tr), as_t(x_te, y_te), img_size or DIGITS_SIZE, pad=1, flip=False)


def read_idx(path: Path) -> Tensor:
    """An IDX file of unsigned bytes (optionally .gz) -> uint8 tensor of its shape; checks length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}): download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes: download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header cut short): download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = 1
    for d in dims:
        expected *= d
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw) - header} data bytes for shape {dims}, "
                        f"expected {expected}; download it again")
    if expected == 0:
        raise DataError(f"{path} holds no items (shape {dims}): download it again")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dir(data_dir: str | None, download: bool) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (each as ``NAME.gz`` or, failing that, ``NAME``).

    Searched in order: ``data_dir``, then ``data_dir/FashionMNIST/raw``; without ``data_dir``, only
    ``FASHION_SYSTEM_DIR`` (/usr/share/datasets/fashion-mnist). Found in none of them: with ``download``,
    torchvision downloads the set into ``data_dir`` (``./data`` when None) and its ``FashionMNIST/raw`` is
    returned; without, ``DataError``.
    """
    stems = [s for pair in FASHION_FILES.values() for s in pair]
    roots = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"] if data_dir else [FASHION_SYSTEM_DIR]
    for folder in roots:
        if all(_find_idx(folder, s) for s in stems):
            return folder
    if download:
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir or "data")
        try:
            FashionMNIST(str(root), train=True, download=True)
        except Exception as e:  # network or disk: anything torchvision raises
            raise DataError(f"could not download Fashion-MNIST into {root}: {e}") from None
        return root / "FashionMNIST" / "raw"
    where = f"{data_dir} (or {data_dir}/FashionMNIST/raw)" if data_dir else str(FASHION_SYSTEM_DIR)
    missing = min(([s for s in stems if not _find_idx(folder, s)] for folder in roots), key=len)
    raise DataError(f"Fashion-MNIST IDX files not found in {where}: {', '.join(missing)} (.gz or not) missing; all "
                    f"four are needed, evaluation too (the training images set the normalisation): pass --data-dir "
                    f"DIR holding them, install dataset-fashion-mnist, or add --download")


def load_fashion_mnist(data_dir: str | None, download: bool, img_size: int | None) -> DataBundle:
    """Fashion-MNIST from its IDX files (found by ``fashion_mnist_dir``), held in memory."""
    folder = fashion_mnist_dir(data_dir, download)
    parts = {}
    for split, (images, labels) in FASHION_FILES.items():
        x, y = read_idx(_find_idx(folder, images)), read_idx(_find_idx(folder, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder}: {images} holds {tuple(x.shape)} but {labels} holds {tuple(y.shape)}")
        if int(y.max()) >= FASHION_CLASSES:
            raise DataError(f"{folder}: {labels} holds label {int(y.max())}, but Fashion-MNIST has {FASHION_CLASSES} "
                            f"classes (0..{FASHION_CLASSES - 1}): download it again")
        parts[split] = (x.float() / 255.0, y.long())
    return _grey_bundle(parts["train"], parts["eval"], img_size, pad=2, flip=True)


# the flags of timm's RGB transforms; digits and Fashion-MNIST have fixed augmentations of their own
RGB_AUGMENTATION_FLAGS = ("aa", "reprob", "remode", "recount", "color_jitter", "interpolation", "crop_pct")


GREY_DATASETS = ("digits", "fashion-mnist")  # augmented their own fixed way: timm's RGB flags do not apply


def ignored_augmentation(args: argparse.Namespace, defaults: argparse.Namespace) -> list[str]:
    """The RGB augmentation flags set away from ``defaults`` on a data set that does not take them."""
    if args.dataset not in GREY_DATASETS:
        return []
    return [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in RGB_AUGMENTATION_FLAGS
            if getattr(args, k) != getattr(defaults, k)]


def _rgb_transforms(args: argparse.Namespace, img_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_pct: float) -> tuple[Callable, Callable]:
    """timm's (train, eval) transforms for RGB images: augmentation from the flags, a centre crop of
    ``--crop-pct`` (else ``crop_pct``) for evaluation; a policy timm does not know is a ConfigError."""
    from timm.data import create_transform

    common = dict(input_size=img_size, interpolation=args.interpolation, mean=mean, std=std)
    try:
        train = create_transform(is_training=True, auto_augment=args.aa, color_jitter=args.color_jitter,
                                 re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, **common)
    except (AssertionError, KeyError, ValueError) as e:  # timm asserts on an --aa policy it does not know
        raise ConfigError(f"--aa {args.aa}: timm cannot build this augmentation ({e})") from None
    evaluate = create_transform(is_training=False, crop_pct=args.crop_pct or crop_pct, **common)
    return train, evaluate


def load_cifar(args: argparse.Namespace) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (``args.dataset``) through torchvision, with timm's train and eval transforms."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
    root = args.data_dir or "data"
    size = args.img_size or 32
    mean, std = CIFAR_STATS[args.dataset]
    train_tf, eval_tf = _rgb_transforms(args, size, mean, std, crop_pct=1.0)
    try:
        train = cls(root, train=True, transform=train_tf, download=args.download)
        test = cls(root, train=False, transform=eval_tf, download=args.download)
    except RuntimeError as e:
        raise DataError(f"{args.dataset} not found or corrupt under {root} ({e}); pass --download, "
                        f"or --data-dir DIR holding the torchvision files") from None
    except OSError as e:
        raise DataError(f"could not fetch {args.dataset} into {root}: {e}") from None
    return DataBundle(train, test, len(train.classes), size, 3, mean, std, in_memory=False)


def read_image(path: str) -> Image.Image:
    """PIL loader for ImageFolder that names the file when it cannot be read.

    16-bit images are scaled to 8 bits (PIL's own conversion clips them to 0 or 255); float images,
    whose range PIL cannot know, are an error.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise DataError(f"image {path} has float pixels (mode F), whose range is unknown: "
                                f"save it as 8-bit or 16-bit")
            if im.mode.startswith("I"):  # I;16 (16-bit PNG) or I (32-bit ints holding 16-bit values)
                pixels = np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8
                return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({e}): replace or remove it") from None


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden entries: a dot-folder (``.ipynb_checkpoints``) is no
    class and a dot-file (macOS's ``._photo.jpg``) or anything in a dot-folder no image."""

    def __init__(self, root: Path, transform: Any) -> None:
        def visible_image(path: str) -> bool:
            hidden = any(part.startswith(".") for part in Path(path).relative_to(root).parts)
            return not hidden and has_file_allowed_extension(path, IMG_EXTENSIONS)

        super().__init__(str(root), transform=transform, loader=read_image, is_valid_file=visible_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def load_imagefolder(args: argparse.Namespace, with_train: bool = True) -> DataBundle:
    """``<data-dir>/train/<class>/*`` and ``<data-dir>/val/<class>/*`` (or ``validation``/``test``), timm transforms.
    Without ``with_train`` only the evaluation split is read (and needed): ``train`` is ``None``."""
    layout = ("DIR/train/<class>/<image> and " if with_train else "") + "DIR/val/<class>/<image>"
    if not args.data_dir:
        raise DataError(f"--dataset imagefolder needs --data-dir DIR with {layout}")
    root = Path(args.data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist: pass --data-dir DIR with {layout}")
    splits = {}
    wanted = (("train", ("train",)),) * with_train + (("eval", ("val", "validation", "test")),)
    for split, names in wanted:
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            raise DataError(f"{root} has no {' or '.join(names)}/ folder: expected {root}/{names[0]}/<class>/<image>")
        splits[split] = folder
    size = args.img_size or 224
    train_tf, eval_tf = _rgb_transforms(args, size, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875)
    folders = {}
    for split, transform in (("train", train_tf), ("eval", eval_tf)):
        if split not in splits:
            continue
        try:
            folders[split] = VisibleImageFolder(splits[split], transform)
        except FileNotFoundError as e:
            raise DataError(f"{splits[split]}: {str(e).rstrip('. ')}: put images in <split>/<class>/ folders") from None
    train, test = folders.get("train"), folders["eval"]
    if train is not None and train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"class folders differ between {splits['train']} ({len(train.classes)}) and "
                        f"{splits['eval']} ({len(test.classes)}): {', '.join(only) or 'the order'} in one only; "
                        f"they must hold the same class names")
    return DataBundle(train, test, len(test.classes), size, 3, IMAGENET_MEAN, IMAGENET_STD, in_memory=False,
                      classes=tuple(test.classes))


# every --dataset: (args, with_train) -> its bundle
LOADERS: dict[str, Callable[[argparse.Namespace, bool], DataBundle]] = {
    "digits": lambda args, with_train: load_digits(args.img_size),
    "fashion-mnist": lambda args, with_train: load_fashion_mnist(args.data_dir, args.download, args.img_size),
    "cifar10": lambda args, with_train: load_cifar(args),
    "cifar100": lambda args, with_train: load_cifar(args),
    "imagefolder": load_imagefolder,
}


def reads_data_dir(dataset: str) -> bool:
    """Whether ``dataset`` is read from --data-dir (digits ships with scikit-learn)."""
    return dataset != "digits"


def build(args: argparse.Namespace, with_train: bool = True) -> DataBundle:
    """The data set named by ``args.dataset`` (with ``--train-subset`` applied). ``with_train=False``
    is for evaluation: an image folder then needs no ``train/`` split (other data sets load it anyway,
    since they hold both splits in one place or normalise with the training statistics)."""
    data_dir = Path(args.data_dir) if args.data_dir else None
    if reads_data_dir(args.dataset) and data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file, not a directory: pass --data-dir DIR, the directory "
                        f"that holds the {args.dataset} files")
    if args.dataset not in LOADERS:
        raise DataError(f"unknown dataset {args.dataset!r}")
    bundle = LOADERS[args.dataset](args, with_train)
    if getattr(args, "train_subset", None) is not None and bundle.train is not None:
        n = len(bundle.train)
        if not 0 < args.train_subset <= n:
            raise DataError(f"--train-subset {args.train_subset} must be between 1 and the {n} training images")
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: args.train_subset]
        bundle.train = Subset(bundle.train, keep.tolist())
    return bundle


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order fixed by seed and epoch) whose next pass can skip its first samples.

    Used with one process too, so the order of an epoch never depends on the global RNG: a run
    resumed mid-epoch skips the batches it already trained on.
    """

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def train_loader(bundle: DataBundle, batch_size: int, workers: int, rank: int, world_size: int,
                 seed: int, device: torch.device) -> DataLoader:
    """Shuffled (per epoch, via ``loader.sampler.set_epoch``), sharded over processes, last partial batch dropped."""
    n = len(bundle.train) // world_size
    if n < batch_size:
        raise DataError(f"{len(bundle.train)} training images over {world_size} process(es) is fewer than one "
                        f"batch of {batch_size}: lower --batch-size")
    sampler = ResumableSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(process_seed(seed, rank)))


def loader_workers(bundle: DataBundle, requested: int | None) -> int:
    """Loader processes: ``--workers``, else 0 for data held in memory (workers would only copy
    its tensors) and, for files to decode, 4 or the CPUs this process may use if fewer (more
    workers than CPUs only contend, and PyTorch warns about them)."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if bundle.in_memory else min(4, cpus)


def eval_loader(bundle: DataBundle, batch_size: int, workers: int, rank: int, world_size: int,
                device: torch.device) -> DataLoader:
    """Every evaluation image exactly once over all processes (no padding duplicates)."""
    shard = Subset(bundle.eval, range(rank, len(bundle.eval), world_size)) if world_size > 1 else bundle.eval
    # its own generator: without one, every pass over the loader draws its workers' seed from the
    # global RNG, so evaluating (the EMA as well, or not) would shift training's dropout draws
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
