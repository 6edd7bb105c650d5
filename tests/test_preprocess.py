"""Images with a labels file, preprocessing presets, and the on-disk cache of decoded images."""
from __future__ import annotations

import csv

import pytest
import torch

from foldship.data import load_images
from foldship.data.cache import CACHE_ENV
from foldship.data.presets import PRESETS, resolve_preprocessing
from foldship.errors import BadInput
from foldship.models.spec import Preprocessing
from foldship.models.timm_models import timm_spec

from .conftest import SHARED

IMAGENET = SHARED / "imagenet_sample"
SMALL = Preprocessing(resize=40, crop=32, interpolation="bicubic")


def sample_csv(folder, count: int = 6):
    """A labels CSV in ``folder`` naming the first ``count`` ImageNet sample images (absolute paths)."""
    with open(IMAGENET / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    path = folder / "subset.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "class_index"])
        writer.writerows([(str(IMAGENET / r["filename"]), r["class_index"]) for r in rows])
    return path, [int(r["class_index"]) for r in rows]


def test_timm_preset_follows_pretrained_cfg():
    p = timm_spec("efficientnet_lite0").preprocessing
    assert (p.resize, p.crop, p.interpolation) == (256, 224, "bicubic")  # 224 / crop_pct 0.875
    assert p.mean == (0.485, 0.456, 0.406)
    preset = resolve_preprocessing(p, "inception-bicubic-224", crop=200)
    assert (preset.resize, preset.crop, preset.mean) == (224, 200, (0.5, 0.5, 0.5))
    assert set(PRESETS) >= {"inception-bicubic-224", "imagenet-bicubic-256-224", "imagenet-bilinear-256-224"}


@pytest.mark.parametrize("bad, message", [({"preset": "imagenet-224"}, "unknown preprocessing preset"),
                                          ({"interpolation": "cubic"}, "unknown interpolation"),
                                          ({"crop": 0}, "crop must be a positive")])
def test_bad_preprocessing_is_refused(bad, message):
    with pytest.raises(BadInput, match=message):
        resolve_preprocessing(Preprocessing(), bad.pop("preset", None), **bad)


def test_labels_csv_decodes_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    labels, classes = sample_csv(tmp_path)
    decoded = []
    first = load_images(labels, SMALL, num_classes=1000, progress=decoded.append)
    assert len(decoded) == 6 and first.y.tolist() == classes and tuple(first.x.shape) == (6, 3, 32, 32)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"  # renamed into place, no temp file left
    decoded.clear()
    again = load_images(labels, SMALL, num_classes=1000, progress=decoded.append)
    assert decoded == [] and torch.equal(again.raw, first.raw)
    # Normalisation is applied after the cache; the pipeline's geometry is part of the key.
    inception = load_images(labels, resolve_preprocessing(SMALL, mean=[0.5] * 3, std=[0.5] * 3), progress=decoded.append)
    assert decoded == [] and torch.allclose(inception.x, first.raw.float() / 127.5 - 1)
    load_images(labels, Preprocessing(resize=40, crop=24), progress=decoded.append)
    assert len(decoded) == 6 and len(list((tmp_path / "cache").iterdir())) == 2


def test_changed_file_invalidates_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "images" / "cls0"
    folder.mkdir(parents=True)
    target = folder / "a.jpeg"
    target.write_bytes((IMAGENET / "n01440764_tench.JPEG").read_bytes())
    first = load_images(tmp_path / "images", SMALL)
    target.write_bytes((IMAGENET / "n01443537_goldfish.JPEG").read_bytes())
    second = load_images(tmp_path / "images", SMALL)
    assert first.y.tolist() == second.y.tolist() == [0]
    assert not torch.equal(first.raw, second.raw)


def test_labels_csv_naming_a_missing_file_is_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("filename,class_index\nnot_here.jpeg,3\n")
    with pytest.raises(BadInput, match="1 file\\(s\\) that do not exist, e.g. .*not_here.jpeg"):
        load_images(path, SMALL)
