"""The example config end to end on real data: EfficientNet-Lite0 from the package checkpoint (mapped by
order), the 1,000 ImageNet sample images (labels CSV, cached decode), top-1 in PyTorch and through ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from foldship.data import load_images
from foldship.exporters.fuse import fuse_batchnorm
from foldship.exporters.onnx_export import export_onnx
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import load_config
from foldship.validators.artifacts import onnx_artifact, run_outputs

from .conftest import ROOT, SHARED

EXAMPLE = ROOT / "examples" / "efficientnet_lite0_imagenet.yaml"


@pytest.fixture(scope="module")
def lite0_imagenet():
    config = load_config(EXAMPLE, data=str(SHARED / "imagenet_sample"))
    loaded = load_from_config(config)
    data = load_images(config.data, loaded.preprocessing, None, loaded.num_classes, input_shape=loaded.input_shape)
    return loaded, data


def test_example_config_loads_the_foreign_checkpoint_with_its_preset(lite0_imagenet):
    loaded, data = lite0_imagenet
    assert loaded.checkpoint_mapping == "by-order"
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop, loaded.preprocessing.interpolation) == \
        (224, 224, "bicubic")
    assert loaded.preprocessing.mean == loaded.preprocessing.std == (0.5, 0.5, 0.5)
    assert tuple(data.x.shape) == (1000, 3, 224, 224) and len(set(data.y.tolist())) == 1000


def test_base_top1_is_820_of_1000_through_onnx_and_pytorch_agrees(lite0_imagenet, tmp_path):
    loaded, data = lite0_imagenet
    path = tmp_path / "lite0.onnx"
    export_onnx(fuse_batchnorm(loaded.model, data.x[:32]).model, loaded.example_inputs(2), path, exporter="legacy")
    logits = run_outputs(onnx_artifact("lite0", path).runner("onnxruntime-cpu", loaded.input_shape), data.x).logits
    labels = data.y.numpy()
    top1 = int((logits.argmax(1) == labels).sum())
    top5 = int((np.argsort(-logits, 1)[:, :5] == labels[:, None]).any(1).sum())
    assert 815 <= top1 <= 825 and top5 >= 950
    # PyTorch on a slice (all 1,000 images at 224 px take minutes on two cores): the same top-1 everywhere.
    with torch.no_grad():
        reference = loaded.model(data.x[:64]).numpy()
    assert (reference.argmax(1) == logits[:64].argmax(1)).all()
    assert float(np.abs(reference - logits[:64]).max()) < 1e-3
