"""Label-free distillation (foldship.compress.distill) on its own and inside ``foldship build``, on the real
ResNet-20 and real CIFAR-10 images: the augmentation, the loss and the schedule against hand computations,
recovery that really moves the student towards the teacher, seeded runs that repeat bit for bit, labels that
never reach training, the report's recovery section, and bad settings refused before anything is written."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from foldship.compress import compress_model
from foldship.compress.distill import (PAD_SHARE, WARMUP_SHARE, DistillSettings, augment, distill, distillation_loss,
                                       learning_rate)
from foldship.data import calibration_images
from foldship.errors import BadInput
from foldship.models.spec import Preprocessing
from foldship.pipeline.build import build
from foldship.pipeline.config import load_config
from foldship.pipeline.report import summary_rows

from .conftest import CIFAR_JPEG

# A fast build: 100 evaluation images, batch 1 only, short timing, no shrink; 4 distillation steps.
FAST = {"limit": 100, "batches": [1], "latency_min_seconds": 0.0, "latency_min_runs": 3, "latency_warmup": 1,
        "exporter": "legacy", "shrinker": "none", "backends": ["onnxruntime-cpu"], "threads": 1,
        "groups": "inner", "repair": "fold-ar", "finetune": "distill", "finetune_epochs": 1, "finetune_batch": 32,
        "finetune_images": 128}


def test_augment_is_a_padded_crop_then_maybe_a_flip():
    """Every output is one of the (2p+1)^2 crops of the image padded by p = side/8 with the fill colour, or its
    mirror image; over 512 draws every crop and both flips occur."""
    n, c, side = 512, 2, 8
    pad = round(PAD_SHARE * side)
    images = torch.arange(n * c * side * side, dtype=torch.float32).reshape(n, c, side, side)
    fill = torch.tensor([-1.0, -2.0])
    out = augment(images, torch.Generator().manual_seed(0), fill)
    assert out.shape == images.shape
    seen = set()
    for i in range(n):
        padded = fill.view(c, 1, 1).repeat(1, side + 2 * pad, side + 2 * pad)
        for y in range(side):
            for x in range(side):
                padded[:, y + pad, x + pad] = images[i, :, y, x]
        matches = [(dy, dx, flip) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
                   if torch.equal(out[i], (lambda crop: crop.flip(2) if flip else crop)(
                       padded[:, dy:dy + side, dx:dx + side]))]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) == (2 * pad + 1) ** 2 * 2


def test_loss_is_the_softened_kl_times_t_squared():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(4, 10)) * 3, rng.normal(size=(4, 10)) * 3
    t = 4.0

    def softmax(z):
        e = np.exp(z / t - (z / t).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(teacher), softmax(student)
    expected = (p * (np.log(p) - np.log(q))).sum(1).mean() * t * t
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), t)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(distillation_loss(torch.tensor(teacher), torch.tensor(teacher), t)) == pytest.approx(0, abs=1e-12)


def test_schedule_warms_up_then_decays_to_zero():
    base = 0.5
    assert learning_rate(base, 0.0) < base / 20
    assert learning_rate(base, WARMUP_SHARE) == pytest.approx(base)
    assert learning_rate(base, (1 + WARMUP_SHARE) / 2) == pytest.approx(base / 2)  # cosine's midpoint
    assert learning_rate(base, 1.0) == pytest.approx(0.0, abs=1e-12)
    decay = [learning_rate(base, WARMUP_SHARE + i / 100 * (1 - WARMUP_SHARE)) for i in range(101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


@pytest.fixture(scope="module")
def calibration(cifar_eval):
    return calibration_images(CIFAR_JPEG, Preprocessing(), cifar_eval, 256, seed=0).x


@pytest.fixture(scope="module")
def folded(resnet20):
    return compress_model(resnet20.model, resnet20.example_inputs(2), "fold", 0.3, 0, "inner", repair="fold-ar",
                          device="cpu").model


def _kl_on(student, teacher, images) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(images), teacher(images), 1.0))


def test_distillation_moves_the_student_towards_the_teacher(resnet20, folded, calibration, cifar_eval):
    """Two epochs on 256 unlabelled calibration images (16 steps) bring the folded ResNet-20's outputs closer to
    the uncompressed model's on the 1,000 evaluation images (never trained on); the teacher is untouched."""
    import copy

    student = copy.deepcopy(folded)
    teacher_state = {k: v.clone() for k, v in resnet20.model.state_dict().items()}
    before = _kl_on(student, resnet20.model, cifar_eval.x)
    record = distill(student, resnet20.model, calibration, DistillSettings(epochs=2, batch=32, threads=1))
    after = _kl_on(student, resnet20.model, cifar_eval.x)
    assert record.steps == 2 * 256 // 32 and record.epochs == 2 and record.images == 256
    assert after < 0.75 * before  # measured: 0.87 -> 0.52
    assert all(torch.equal(v, teacher_state[k]) for k, v in resnet20.model.state_dict().items())
    assert not student.training and not any(m.training for m in student.modules())


def test_seeded_distillation_repeats_bit_for_bit(resnet20, folded, calibration):
    import copy

    states = []
    for seed in (0, 0, 1):
        student = copy.deepcopy(folded)
        distill(student, resnet20.model, calibration[:128], DistillSettings(epochs=1, batch=64, seed=seed, threads=1))
        states.append(student.state_dict())
    same = [torch.equal(states[0][k], states[1][k]) for k in states[0]]
    other = [torch.equal(states[0][k], states[2][k]) for k in states[0]]
    assert all(same)
    assert not all(other)  # another seed draws other batches and crops


def test_depthwise_models_train_channels_last_on_the_cpu_and_come_back_in_the_default_layout(calibration, monkeypatch):
    """MobileNetV2 (depthwise convolutions) trains in channels-last layout on the CPU; the student comes back
    contiguous (safetensors and the exporters expect it), the caller's teacher keeps its layout, and the result
    is the default layout's to rounding: the layouts only sum in another order (one epoch, 2 steps)."""
    import copy

    import torchvision

    from foldship.compress import distill as module
    from foldship.compress.distill import training_layout

    torch.manual_seed(0)
    teacher = torchvision.models.mobilenet_v2(num_classes=10).eval()
    folded_mobilenet = compress_model(teacher, calibration[:2], "fold", 0.25, groups="inner").model
    images = calibration[:128]
    assert training_layout(folded_mobilenet, images, torch.device("cpu")) == torch.channels_last
    assert training_layout(folded_mobilenet, images, torch.device("cuda")) == torch.contiguous_format
    assert training_layout(folded_mobilenet, images.flatten(2), torch.device("cpu")) == torch.contiguous_format
    students, seen_layouts = {}, {}
    for channels_last in (False, True):
        monkeypatch.setattr(module, "CHANNELS_LAST_ON_CPU", channels_last)
        students[channels_last] = copy.deepcopy(folded_mobilenet)
        first_conv = next(m for m in students[channels_last].modules() if isinstance(m, torch.nn.Conv2d))
        seen = seen_layouts.setdefault(channels_last, set())
        hook = first_conv.register_forward_pre_hook(
            lambda _, inputs, seen=seen: seen.add(inputs[0].is_contiguous(memory_format=torch.channels_last)))
        distill(students[channels_last], teacher, images, DistillSettings(epochs=1, batch=64, threads=1))
        hook.remove()
    assert seen_layouts == {False: {False}, True: {True}}  # each run trained on batches in its layout
    for model in (students[True], teacher):
        assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        a, b = students[False](images[:64]), students[True](images[:64])
    assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max())


def test_models_without_depthwise_convolutions_keep_the_default_layout(folded, calibration):
    from foldship.compress.distill import training_layout

    assert training_layout(folded, calibration, torch.device("cpu")) == torch.contiguous_format


def test_a_model_without_trainable_parameters_is_refused(resnet20, folded, calibration):
    import copy

    student = copy.deepcopy(folded).requires_grad_(False)
    with pytest.raises(BadInput, match="needs trainable parameters"):
        distill(student, resnet20.model, calibration, DistillSettings(epochs=1, threads=1))


def test_fewer_images_than_a_batch_are_refused(resnet20, folded, calibration):
    with pytest.raises(BadInput, match="needs at least 64 calibration images .* got 10"):
        distill(folded, resnet20.model, calibration[:10], DistillSettings(epochs=1, batch=64))


DISTILL = {"finetune": "distill", "calibration_data": str(CIFAR_JPEG)}


@pytest.mark.parametrize("values,message", [
    ({"finetune": "distill"}, "--finetune distill needs --calibration-data"),
    (DISTILL | {"finetune": "retrain"}, "unknown finetune 'retrain'"),
    ({"finetune_epochs": 3}, "--finetune-epochs only apply to recovery; add --finetune distill"),
    (DISTILL | {"finetune_epochs": 0}, "--finetune-epochs must be a whole number >= 1, got 0"),
    (DISTILL | {"finetune_epochs": -2}, "--finetune-epochs must be a whole number >= 1, got -2"),
    (DISTILL | {"finetune_epochs": 1.5}, "--finetune-epochs must be a whole number >= 1, got 1.5"),
    (DISTILL | {"finetune_minutes": 0}, "--finetune-minutes must be a positive number of minutes, got 0"),
    (DISTILL | {"finetune_minutes": -1.0}, "--finetune-minutes must be a positive"),
    (DISTILL | {"finetune_epochs": 2, "finetune_minutes": 1.0}, "give --finetune-epochs or --finetune-minutes, not both"),
    (DISTILL | {"finetune_lr": 0.0}, "--finetune-lr must be a positive learning rate"),
    (DISTILL | {"finetune_lr": -0.1}, "--finetune-lr must be a positive learning rate"),
    (DISTILL | {"finetune_lr": float("nan")}, "--finetune-lr must be a positive learning rate"),
    (DISTILL | {"finetune_batch": 0}, "--finetune-batch must be a whole number >= 1"),
    (DISTILL | {"finetune_images": 0}, "--finetune-images must be a whole number >= 1"),
])
def test_bad_recovery_settings_are_refused_by_the_config(values, message):
    with pytest.raises(BadInput) as caught:
        load_config(None, **values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _calibration_npz(path, labels: str) -> str:
    """300 JPEG-decoded CIFAR-10 test images with their labels, every label wrong, or none at all."""
    data = np.load(CIFAR_JPEG)
    x, y = data["x"][:300], data["y"][:300]
    arrays = {"true": {"x": x, "y": y}, "wrong": {"x": x, "y": (y + np.random.default_rng(1).integers(1, 10, len(y))) % 10},
              "none": {"x": x}}[labels]
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def recovered_builds(tmp_path_factory):
    """The same distilling build with the calibration images' labels as they are, all wrong, or removed."""
    root = tmp_path_factory.mktemp("recovery")
    runs = {}
    for labels in ("true", "wrong", "none"):
        calibration = _calibration_npz(root / f"calibration_{labels}.npz", labels)
        config = load_config(None, **FAST, calibration_data=calibration, out=str(root / labels))
        runs[labels] = build(config)
    return runs


def test_distilling_build_is_byte_identical_whatever_the_calibration_labels(recovered_builds):
    """Training never reads labels: with every calibration label changed or none at all, the build writes
    the same ONNX and weights, byte for byte (same seed, same thread count)."""
    from pathlib import Path

    files = {labels: {name: (Path(run.out) / name).read_bytes() for name in ("compressed.onnx",
                                                                            "compressed.safetensors")}
             for labels, run in recovered_builds.items()}
    assert files["true"] == files["wrong"] == files["none"]


def test_report_has_the_recovery_section(recovered_builds, resnet20, cifar_eval):
    from pathlib import Path

    run = recovered_builds["true"]
    report = json.loads((Path(run.out) / "report.json").read_text())
    recovery = report["recovery"]
    assert report["finetune"] == "distill" and recovery["method"] == "distill"
    assert recovery["images"] == 128 and recovery["batch"] == 32 and recovery["steps"] == 128 // 32
    assert recovery["epochs"] == 1 and recovery["budget"] == {"epochs": 1} and recovery["device"] == "cpu"
    assert recovery["threads"] == 1 and recovery["seconds"] > 0
    assert [p["step"] for p in recovery["loss_curve"]] == [1, 2, 3, 4]  # 4 steps per epoch: one point each
    after, before = recovery["after"], recovery["before"]
    assert after["backend"] == "onnxruntime-cpu" and before["backend"] == "torch-cpu"
    assert (after["correct"], after["total"]) == (report["compressed"]["correct"], 100)
    assert after["top1_agreement"] == report["agreement"]["top1_agreement"]
    # "before" is the fold + fold-ar model without recovery, scored here independently
    plain = compress_model(resnet20.model, resnet20.example_inputs(2), "fold", 0.3, 0, "inner", repair="fold-ar",
                           device="cpu").model
    with torch.no_grad():
        predicted = plain(cifar_eval.x[:100]).argmax(1)
        reference = resnet20.model(cifar_eval.x[:100]).argmax(1)
    assert before["correct"] == int((predicted == cifar_eval.y[:100]).sum()) and before["total"] == 100
    assert before["top1_agreement"] == pytest.approx(float((predicted == reference).float().mean()))
    assert (Path(run.out) / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (Path(run.out) / "report.md").read_text()
    assert "## Recovery" in markdown and "![distillation loss](recovery.png)" in markdown
    assert f"| before recovery | {100 * before['accuracy']:.1f}% ({before['correct']}/100) |" in markdown
    row = [r for r in summary_rows(report) if r[0].startswith("top-1 before recovery")]
    assert row == [("top-1 before recovery (torch-cpu)", "", f"{100 * before['accuracy']:.1f}% ({before['correct']}/100)",
                    f"{100 * (before['accuracy'] - report['baseline']['accuracy']):+.1f} pt")]
    spec = json.loads((Path(run.out) / "compressed.json").read_text())
    assert spec["compression"]["finetune"] == "distill"
