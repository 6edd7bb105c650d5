"""A compressed engine with its own, smaller input (``compressed_input_size``, pipeline/inputs.py): built,
scored, timed and re-validated at that input, the baseline at its own, on the same pictures."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import foldship
from foldship.data.presets import scaled_to
from foldship.errors import BadInput
from foldship.models.spec import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from foldship.pipeline.build import build
from foldship.pipeline.config import load_config
from foldship.pipeline.export import export
from foldship.pipeline.targets import bench_run
from foldship.pipeline.validate import validate_artifacts

from .conftest import CIFAR_LOSSLESS, invoke_cli

IMAGES = 100
# ResNet-20 on 32 x 32 CIFAR-10 images as PNG files, resized on loading (resize 32 is the identity) so that the
# compressed side can take 24 x 24; the shortest latency protocol (layout only, never speed).
SETTINGS = {"resize": 32, "crop": 32, "compressed_input_size": 24, "groups": "inner", "backends": ["onnxruntime-cpu"],
            "batches": [1, 8], "latency_min_seconds": 0, "latency_min_runs": 3, "latency_warmup": 1,
            "latency_trials": 3, "threads": 1}


@pytest.fixture(scope="module")
def cifar_pngs(tmp_path_factory):
    arrays = np.load(CIFAR_LOSSLESS)
    x, y = arrays["x"][:IMAGES], arrays["y"][:IMAGES]
    folder = tmp_path_factory.mktemp("cifar_png")
    for i, (image, label) in enumerate(zip(x, y)):
        (folder / str(label)).mkdir(exist_ok=True)  # one digit per class: folders sort as the class indices
        Image.fromarray(image).save(folder / str(label) / f"{i:03d}.png")
    order = sorted(range(IMAGES), key=lambda i: (int(y[i]), i))  # the folder's order: by class, then file name
    return folder, x[order], y[order]


@pytest.fixture(scope="module")
def run24(cifar_pngs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run24"
    build(load_config(None, data=str(cifar_pngs[0]), target_macs=0.45, out=str(out), **SETTINGS))
    return json.loads((out / "report.json").read_text()), out


def _onnx_input(path) -> list[int]:
    return [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:]]


def _logits(path, x: np.ndarray) -> np.ndarray:
    """``path`` in ONNX Runtime on uint8 NHWC images, normalised by hand with the ImageNet statistics."""
    inputs = ((x.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def test_the_compressed_engine_takes_its_own_smaller_input(run24):
    report, out = run24
    assert _onnx_input(out / "baseline.onnx") == [3, 32, 32] and _onnx_input(out / "compressed.onnx") == [3, 24, 24]
    assert report["compressed"]["input"]["shape"] == [3, 24, 24]
    assert report["compressed"]["input"]["preprocessing"]["resize"] == 24
    assert report["baseline"]["input"]["shape"] == [3, 32, 32]
    budget = report["compression"]["budget"]
    # Every ResNet-20 feature map shrinks by (24/32)^2 (32/16/8 -> 24/12/6); only the 640 MACs of the 64 x 10
    # classifier do not: 0.5625 + 0.4375 * 640 / 40,551,040 = 0.562507, recorded to 4 decimals.
    assert budget["input_mac_fraction"] == 0.5625
    # The goal stays a fraction of the baseline at 32 px, and the engine meets it in all.
    assert budget["goal"] == 0.45 and report["mac_ratio"] <= 0.45
    assert report["mac_ratio"] == report["compressed"]["macs"] / report["baseline"]["macs"]
    assert "the compressed engine takes 3x24x24" in (out / "report.md").read_text()
    loaded = foldship.load_compressed(out)
    assert loaded.input_shape == (3, 24, 24) and (loaded.preprocessing.resize, loaded.preprocessing.crop) == (24, 24)


def test_each_side_is_scored_on_the_same_pictures_at_its_own_input(run24, cifar_pngs):
    report, out = run24
    _, x, y = cifar_pngs
    # PIL's bilinear resize (what torchvision's resize does to a PIL image), then a centre crop of the whole.
    small = np.stack([np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR)) for image in x])
    base = _logits(out / "baseline.onnx", x).argmax(1)
    comp = _logits(out / "compressed.onnx", small).argmax(1)
    assert report["baseline"]["correct"] == int((base == y).sum())
    assert report["compressed"]["correct"] == int((comp == y).sum())
    assert report["agreement"]["top1_agreement"] == pytest.approx(float((base == comp).mean()))


def test_a_run_folder_is_revalidated_benched_and_exported_at_each_sides_input(run24, cifar_pngs, tmp_path):
    report, out = run24
    validate_artifacts([out], load_config(None, out=str(tmp_path / "again"), **SETTINGS))
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    for side in ("baseline", "compressed"):
        assert again[side]["correct"] == report[side]["correct"]
        assert again[side]["input"] == report[side]["input"]
    with pytest.raises(BadInput, match=r"compressed.onnx takes inputs of shape \(3, 24, 24\) but its images are "
                                       r"\(3, 32, 32\); validate the run folder"):  # the pair alone cannot know
        validate_artifacts([out / "baseline.onnx", out / "compressed.onnx"],
                           load_config(None, data=str(cifar_pngs[0]), out=str(tmp_path / "pair"), **SETTINGS))
    bench = bench_run(out, batches=[1], threads=1, min_seconds=0, trials=1)
    assert bench["input_shape"] == [3, 32, 32] and bench["compressed_input_shape"] == [3, 24, 24]
    with pytest.raises(BadInput, match="take different inputs"):
        bench_run(out, batches=[1], threads=1, min_seconds=0, trials=1, input_shape=(3, 32, 32))
    # export --run checks each shrunk file in ONNX Runtime on images of its own input (a 24 x 24 file refuses 32)
    with pytest.raises(BadInput, match=r"shape \(3, 32, 32\).*takes \(3, 24, 24\)"):  # .npz: stored 32 x 32
        export(load_config(None, out=str(tmp_path / "exported"), **SETTINGS), run=out)
    exported = export(load_config(None, data=str(cifar_pngs[0]), out=str(tmp_path / "exported"), **SETTINGS),
                      run=out).report
    assert sorted(exported["export"]["models"]) == ["baseline", "compressed"]
    assert _onnx_input(tmp_path / "exported" / "compressed.onnx") == [3, 24, 24]


def test_the_preprocessing_keeps_the_crop_fraction():
    # 256 -> 224 is a crop fraction of 0.875; at 200 px: resize 200 / 0.875 = 228.6 -> 229, crop 200.
    assert scaled_to(Preprocessing(resize=256, crop=224), 224, 200) == Preprocessing(resize=229, crop=200)
    assert scaled_to(Preprocessing(resize=224, crop=224), 224, 196) == Preprocessing(resize=196, crop=196)
    with pytest.raises(BadInput, match="set the config keys resize and crop"):
        scaled_to(Preprocessing(), 32, 24)


def test_npz_images_cannot_shrink_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    result = invoke_cli("build", "--compressed-input-size", "24", "--out", str(out), "--quiet")
    assert result.returncode == 2 and "resize" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("settings, message", [
    ({"compressed_input_size": 32}, "not smaller than the model's 32 px"),
    ({"compressed_input_size": 0}, "whole number of pixels"),
    ({"target_macs": 0.6}, "the smaller input alone leaves 0.563x"),  # already under 0.6: nothing to plan
])
def test_sizes_and_targets_that_cannot_be_met_are_refused(settings, message, cifar_pngs, tmp_path):
    config = {**SETTINGS, "data": str(cifar_pngs[0]), "out": str(tmp_path / "run")} | settings
    with pytest.raises(BadInput, match=message):
        build(load_config(None, **config))
    assert list(tmp_path.iterdir()) == []
