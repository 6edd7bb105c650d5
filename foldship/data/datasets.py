"""Labelled image sets (``.npz`` arrays or image folders) and calibration images kept apart from them."""
from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInput
from ..models.spec import Preprocessing
from .cache import cache_key, read_cached, write_cached

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class ImageSet:
    """Preprocessed images (float32 NCHW) with optional integer labels."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str
    raw: torch.Tensor  # uint8 NCHW before normalisation, for overlap checks

    def __len__(self) -> int:
        return len(self.x)


def load_images(path: str | Path, preprocessing: Preprocessing, limit: int | None = None,
                num_classes: int | None = None, require_labels: bool = True,
                input_shape: tuple[int, ...] | None = None,
                progress: Callable[[int], None] | None = None) -> ImageSet:
    """Load ``path``: an ``.npz`` with uint8 NHWC ``x`` and int ``y``, an image folder (one
    sub-folder per class, or a ``labels.csv``), or a CSV of ``filename,class_index`` itself.

    With ``num_classes`` every label must be a class of the model; with ``input_shape`` (C, H, W)
    the preprocessed images must have the model's input shape. ``progress`` is advanced once per
    decoded image (images read from the cache are not decoded).
    """
    raw, y = read_raw(path, preprocessing, limit, progress)
    if require_labels and y is None:
        raise BadInput(f"data {path} has no labels ('y' array or class folders); accuracy needs labelled data")
    if y is not None and num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise BadInput(f"data {path} has labels in [{int(y.min())}, {int(y.max())}] but the model has {num_classes} "
                       f"classes; use the dataset the model was trained for or set num_classes")
    x = normalise(raw, preprocessing)
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise BadInput(f"data {path} gives images of shape {tuple(x.shape[1:])} (C, H, W) but the model takes "
                       f"{tuple(input_shape)}; use images of the model's size or set input_size / resize / crop")
    return ImageSet(x, y, str(path), raw)


def read_raw(path: str | Path, preprocessing: Preprocessing, limit: int | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The uint8 NCHW images of ``path`` (resized and cropped, not normalised) and their labels, if any."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"data {path} does not exist; pass a .npz file, an image folder or a labels CSV to --data")
    raw, y = _read_npz(path) if path.suffix == ".npz" else _read_folder(path, preprocessing, progress, limit)
    if limit is not None:
        raw, y = raw[:limit], (None if y is None else y[:limit])
    if len(raw) == 0:
        raise BadInput(f"data {path} holds no images; point --data at a non-empty dataset")
    return raw, y


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        arrays = np.load(path, allow_pickle=False)
        x = arrays["x"]
        y = arrays["y"] if "y" in arrays.files else None
    except KeyError:
        raise BadInput(f"data {path} has no 'x' array; save images as x (uint8, N x H x W x 3) and labels as y") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # truncated or not an npz at all
        raise BadInput(f"data {path} is not a readable .npz file ({exc}); re-save it with numpy.savez") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise BadInput(f"data {path}: x is {x.dtype} {x.shape}, expected uint8 images N x H x W x 3 (RGB, 0..255)")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
        raise BadInput(f"data {path}: y is {y.dtype} {y.shape}, expected {len(x)} integer labels")
    raw = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return raw, (None if y is None else torch.from_numpy(y.astype(np.int64)))


def _read_folder(path: Path, preprocessing: Preprocessing,
                 progress: Callable[[int], None] | None,
                 limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = _list_images(path)[:limit]  # decode only the images that will be used
    labels = torch.tensor([c for _, c in rows], dtype=torch.long)
    return _decode_cached(path, [file for file, _ in rows], preprocessing, progress), \
        (None if len(rows) == 0 or bool((labels < 0).any()) else labels)


def _list_images(path: Path) -> list[tuple[Path, int]]:
    """(file, class) rows of a labels CSV or a folder (class -1: unlabelled)."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_labels_csv(path)
    if not path.is_dir():
        raise BadInput(f"data {path} is neither a .npz file, a labels CSV nor an image folder")
    if (path / "labels.csv").exists():
        return _read_labels_csv(path / "labels.csv")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    rows = [(file, c) for c, name in enumerate(classes) for file in sorted((path / name).iterdir())
            if file.suffix.lower() in IMAGE_SUFFIXES]
    if not classes:
        rows = [(file, -1) for file in sorted(path.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES]
    return rows


def _read_labels_csv(labels_csv: Path) -> list[tuple[Path, int]]:
    """Rows ``filename,class_index`` (other columns ignored), file names relative to the CSV's folder."""
    try:
        with open(labels_csv, newline="") as f:
            rows = [(labels_csv.parent / r["filename"], int(r["class_index"])) for r in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{labels_csv} needs the columns filename,class_index with integer classes ({exc!r})") from None
    missing = [str(file) for file, _ in rows if not file.is_file()]
    if missing:
        raise BadInput(f"{labels_csv} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}; "
                       f"fix the filename column (names are relative to the CSV's folder)")
    return rows


def _decode_cached(path: Path, files: list[Path], preprocessing: Preprocessing,
                   progress: Callable[[int], None] | None) -> torch.Tensor:
    steps = {"resize": preprocessing.resize, "crop": preprocessing.crop, "interpolation": preprocessing.interpolation}
    key = cache_key(files, steps)
    images = read_cached(key)
    if images is None:
        images = _decode(path, files, preprocessing, progress)
        if len(images):
            write_cached(key, images)
    return images


def _decode(path: Path, files: list[Path], preprocessing: Preprocessing,
            progress: Callable[[int], None] | None) -> torch.Tensor:
    from PIL import Image

    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(_resize_crop(image.convert("RGB"), preprocessing))
        except OSError as exc:
            raise BadInput(f"image {file} cannot be read ({exc}); remove or replace it") from None
        if progress:
            progress(1)
    if not images:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    sizes = sorted({tuple(image.shape) for image in images})
    if len(sizes) > 1:
        raise BadInput(f"images in {path} have different sizes {sizes[:3]}; set resize and crop so they match")
    return torch.stack(images)


def _resize_crop(image, preprocessing: Preprocessing) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if preprocessing.resize:
        image = TF.resize(image, preprocessing.resize, InterpolationMode(preprocessing.interpolation))
    if preprocessing.crop:
        image = TF.center_crop(image, preprocessing.crop)
    return TF.pil_to_tensor(image)


def normalise(raw: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1] -> (x - mean) / std per channel."""
    x = raw.to(torch.float32) / 255.0
    if x.shape[1] != len(preprocessing.mean):
        raise BadInput(f"images have {x.shape[1]} channel(s) but the model's preprocessing expects "
                       f"{len(preprocessing.mean)}; convert the images (e.g. grayscale to RGB) or set mean and std")
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass
class CalibrationImages:
    """Unlabelled calibration images, and how many of the source's images were left out as
    near-copies of the evaluation images (``evaluation`` names those; None when none were given)."""

    x: torch.Tensor
    source: str
    read: int  # images in the calibration data
    near_copies: int  # of them dropped as near-copies of evaluation images
    evaluation: str | None

    def __len__(self) -> int:
        return len(self.x)

    def summary(self) -> dict:
        return {"path": self.source, "images": len(self.x), "read": self.read,
                "dropped_near_copies": self.near_copies, "kept_apart_from": self.evaluation}


def calibration_images(path: str | Path, preprocessing: Preprocessing, evaluation: ImageSet | None,
                       count: int = 512, seed: int = 0) -> CalibrationImages:
    """Up to ``count`` unlabelled images from ``path`` that are not near-copies of ``evaluation``'s
    images (``near_duplicates``), chosen at random with ``seed``: the one place calibration images
    are read, so every path (build, compress, sweep, the budget survey) applies the same rule."""
    raw, _ = read_raw(path, preprocessing)
    keep = torch.ones(len(raw), dtype=torch.bool)
    if evaluation is not None:
        keep = ~near_duplicates(raw, evaluation.raw)
    candidates = torch.nonzero(keep).flatten()
    if len(candidates) == 0:
        raise BadInput(f"calibration data {path} only holds near-copies of the evaluation images "
                       f"({len(raw)} of {len(raw)}); use other images")
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    return CalibrationImages(normalise(raw[chosen], preprocessing), str(path), len(raw), len(raw) - len(candidates),
                             None if evaluation is None else evaluation.source)


# Near-copy rule: 8x8 thumbnails (0..255) within this mean absolute difference ...
COPY_DISTANCE = 12.0
# ... and with this correlation of their patterns (brightness removed). JPEG re-encodes of CIFAR-10
# test images correlate >= 0.988 with their originals, distinct test images <= 0.962 (and 14 of
# them were within the distance alone).
COPY_CORRELATION = 0.975
FLAT = 1.0  # thumbnails with a spread below this (grey levels) have no pattern to correlate


def near_duplicates(pool: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Boolean mask over ``pool`` (uint8 NCHW): True where some ``reference`` image is a near-copy.

    Two images are near-copies when their 8x8 thumbnails differ by less than COPY_DISTANCE grey
    levels on average and their patterns correlate at least COPY_CORRELATION (two flat thumbnails
    need only the distance): re-encoded or lightly noised versions of one picture, never two
    pictures that merely share a background.
    """
    def thumbs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        small = F.adaptive_avg_pool2d(images.to(torch.float32), 8).flatten(1)
        centred = small - small.mean(1, keepdim=True)
        spread = centred.norm(dim=1) / centred.shape[1] ** 0.5
        return small, centred / spread.clamp_min(1e-6)[:, None] / centred.shape[1] ** 0.5, spread < FLAT

    a, a_unit, a_flat = thumbs(pool)
    b, b_unit, b_flat = thumbs(reference)
    dup = torch.zeros(len(a), dtype=torch.bool)
    for start in range(0, len(a), 1024):
        alike = (a_unit[start:start + 1024] @ b_unit.T >= COPY_CORRELATION) | (a_flat[start:start + 1024, None] & b_flat)
        i, j = torch.nonzero(alike, as_tuple=True)  # few pairs: the distance only for those
        i = i + start
        close = (a[i] - b[j]).abs().mean(1) < COPY_DISTANCE
        dup[i[close]] = True
    return dup
