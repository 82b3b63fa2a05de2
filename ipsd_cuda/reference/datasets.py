"""Image classification data for the reference experiments, held in memory as uint8.

Sources: Fashion-MNIST (idx .gz files), CIFAR-10/100 (torchvision's copies on
disk), any user's ``.npz`` arrays, and a synthetic set for tests.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclass
class ImageData:
    """Train and test splits: images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> "ImageData":
        """A random subset of each split (the whole split where the size is None)."""
        g = torch.Generator().manual_seed(seed)

        def pick(x, y, size):
            if size is None or size >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=g)[:size]
            return x[idx], y[idx]

        x_train, y_train = pick(self.x_train, self.y_train, train)
        x_test, y_test = pick(self.x_test, self.y_test, test)
        return ImageData(x_train, y_train, x_test, y_test, self.name)

    def balanced(self, per_class: int, seed: int = 0) -> "ImageData":
        """A training split of ``per_class`` random images of every class (the test split whole).

        The images of each class are drawn from one shuffle of that class,
        so with the same ``seed`` a smaller subset is part of a larger one.

        Example:
            >>> from ipsd_cuda.reference.datasets import synthetic
            >>> small = synthetic(num_classes=4).balanced(10)
            >>> small.y_train.bincount().tolist()
            [10, 10, 10, 10]
        """
        g = torch.Generator().manual_seed(seed)
        picked = []
        for c in range(self.num_classes):
            members = (self.y_train == c).nonzero().squeeze(1)
            if len(members) < per_class:
                raise ValueError(f"class {c} has {len(members)} training images, fewer than {per_class}")
            picked.append(members[torch.randperm(len(members), generator=g)[:per_class]])
        idx = torch.cat(picked).sort().values
        return ImageData(self.x_train[idx], self.y_train[idx], self.x_test, self.y_test, self.name)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims, big-endian sizes, uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # A copy, since torch tensors must not share read-only buffers.
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> ImageData:
    """Fashion-MNIST from its four idx .gz files in ``data_dir``."""
    root = Path(data_dir)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). On Debian/Ubuntu: "
            "`sudo apt-get install dataset-fashion-mnist` puts it in /usr/share/datasets/fashion-mnist; "
            "or download the four idx .gz files from github.com/zalandoresearch/fashion-mnist and "
            "pass --data-dir."
        )
    arrays = {key: _read_idx(root / name) for key, name in FASHION_MNIST_FILES.items()}
    return _from_arrays(arrays, "fashion-mnist")


def load_cifar(name: str, data_dir: str) -> ImageData:
    """CIFAR-10/100 from torchvision's files under ``data_dir`` (never downloaded)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(data_dir, train=True, download=False)
        test = cls(data_dir, train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{name} not found under {data_dir}: put torchvision's extracted copy there "
            f"(e.g. {data_dir}/cifar-10-batches-py) or pass --data-dir. ({err})"
        ) from err
    arrays = {
        "x_train": train.data,
        "y_train": np.asarray(train.targets),
        "x_test": test.data,
        "y_test": np.asarray(test.targets),
    }
    return _from_arrays(arrays, name)


def load_npz(path: str) -> ImageData:
    """A user's arrays: ``x_train, y_train, x_test, y_test``; ``x`` as ``N,H,W`` or ``N,H,W,C``,
    uint8 or float (floats in [0, 1] are scaled to 0..255)."""
    with np.load(path) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)}")
        arrays = {key: f[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    return _from_arrays(arrays, Path(path).stem)


def synthetic(
    num_train: int = 512, num_test: int = 256, num_classes: int = 4, size: int = 16, seed: int = 0
) -> ImageData:
    """A small learnable set: each class is a noisy version of its own random template."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 1, size, size, generator=g) * 255

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, 1, size, size, generator=g) * 60
        return (templates[y] + noise).clamp(0, 255).to(torch.uint8), y

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return ImageData(x_train, y_train, x_test, y_test, "synthetic")


def _images(x: np.ndarray) -> torch.Tensor:
    if np.issubdtype(x.dtype, np.floating):
        scale = 255.0 if x.max() <= 1.0 else 1.0
        x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"images must be N,H,W or N,H,W,C, got shape {tuple(t.shape)}")


def _from_arrays(arrays: dict, name: str) -> ImageData:
    return ImageData(
        _images(arrays["x_train"]),
        torch.from_numpy(np.asarray(arrays["y_train"]).astype(np.int64)),
        _images(arrays["x_test"]),
        torch.from_numpy(np.asarray(arrays["y_test"]).astype(np.int64)),
        name,
    )


def load(data: str, data_dir: Optional[str] = None) -> ImageData:
    """Resolve ``--data``: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``synthetic`` or a ``.npz`` path."""
    if data == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if data in ("cifar10", "cifar100"):
        return load_cifar(data, data_dir or os.path.expanduser("~/.cache/cifar"))
    if data == "synthetic":
        return synthetic()
    if data.endswith(".npz"):
        return load_npz(data)
    raise ValueError(f"--data must be fashion-mnist, cifar10, cifar100, synthetic or a .npz path, got {data!r}")
