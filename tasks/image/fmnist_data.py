"""Fashion-MNIST from its original IDX files (Debian's ``dataset-fashion-mnist`` package).

The four files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` are looked for in a
folder and in its ``FashionMNIST/raw/`` subfolder (where torchvision's download puts them), so
one reader serves both the Debian package and ``torchvision.datasets.FashionMNIST``:

    images, labels = read_split("/usr/share/datasets/fashion-mnist", "train")
    # images: uint8 (60000, 28, 28), labels: int64 (60000,)
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
PREFIX = {"train": "train", "test": "t10k"}
SIZES = {"train": 60_000, "test": 10_000}
MISSING = (
    "Fashion-MNIST not found in {where}. Install Debian's package "
    "(`sudo apt-get install dataset-fashion-mnist`, files in " + DEBIAN_DIR + "), or let "
    "torchvision download it (`unipred demo image` does, on a machine with internet; or "
    "python -c \"import torchvision; torchvision.datasets.FashionMNIST('DIR', download=True)\" "
    "and pass data.root=DIR)."
)


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def has_fashion_mnist(folder: str | os.PathLike) -> bool:
    """True when ``folder`` (or its FashionMNIST/raw/) holds all four IDX files."""
    f = Path(folder)
    return all(
        _find(f, f"{PREFIX[s]}-{kind}-ubyte")
        for s in PREFIX
        for kind in ("images-idx3", "labels-idx1")
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (optionally gzipped) -> uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start, n = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - start != n:
        raise ValueError(
            f"{path}: truncated or corrupt IDX file: header says {dims} = {n} bytes, "
            f"found {len(data) - start}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def read_split(folder: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of split "train" or "test"."""
    if split not in PREFIX:
        raise ValueError(f"Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = Path(folder)
    paths = [_find(folder, f"{PREFIX[split]}-{k}-ubyte") for k in ("images-idx3", "labels-idx1")]
    if None in paths:
        raise FileNotFoundError(MISSING.format(where=folder))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{paths[1]}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def locate(download_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding Fashion-MNIST: Debian's, else ``download_dir`` (downloading there
    with torchvision when ``download``). Raises FileNotFoundError with install hints."""
    if has_fashion_mnist(DEBIAN_DIR):
        return Path(DEBIAN_DIR)
    if download_dir is None:
        download_dir = Path.home() / ".cache" / "unipred" / "fashion-mnist"
    d = Path(download_dir)
    if has_fashion_mnist(d):
        return d
    if download:
        try:
            import torchvision

            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(d), train=train, download=True)
        except Exception as e:  # no internet, proxy, disk full: say what to do instead
            raise FileNotFoundError(
                MISSING.format(where=f"{DEBIAN_DIR} or {d}")
                + f" (torchvision's download failed: {type(e).__name__}: {e})"
            ) from None
        if has_fashion_mnist(d):
            return d
    raise FileNotFoundError(MISSING.format(where=f"{DEBIAN_DIR} or {d}"))
