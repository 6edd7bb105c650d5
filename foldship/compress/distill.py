"""Label-free recovery: train the compressed model to reproduce the uncompressed model's outputs.

The student (the compressed copy) learns the teacher's (the uncompressed model's) softened output
distribution, KL(softmax(t / T) || softmax(s / T)) * T^2 (Hinton et al. 2015), on unlabelled
calibration images with the standard augmentation for images: a random crop from the image padded
by 1/8 of its size on every side (padding is black), and a horizontal flip with probability 1/2.
Nothing here takes labels: ``distill`` receives image tensors only, so what it learns comes from
the teacher's outputs alone.

Optimiser: AdamW without weight decay (a few epochs from a trained start; the teacher is the
regulariser), learning rate ``lr``, a linear warm-up over the first WARMUP_SHARE of the steps, then
cosine decay to zero. Adam's per-parameter step sizes do not depend on a layer's weight scale, which
Fold-AR changes (it divides producer rows by their BN's running std): SGD with Nesterov momentum
diverged from a Fold-AR start at learning rates 0.02 and 0.005 with frozen BatchNorm statistics.
The schedule runs over the planned steps (``epochs``) or over the wall-clock budget (``minutes``:
the schedule follows elapsed time, and training stops when the budget is spent).

The whole student trains in eval mode: BatchNorm normalises with its stored running statistics
(frozen; its scale and shift still learn), dropout and drop-path stay off. Train-mode BatchNorm
re-estimates the statistics from the training batches, i.e. from augmented calibration images,
which for CIFAR-10 are JPEG-decoded copies that cost the uncompressed ResNet-20 10 points; frozen
statistics recovered more (docs/recovery.md has the measurement).

Deterministic: the shuffling and the augmentation draw from one seeded generator, PyTorch's
deterministic algorithms are on while training, so a fixed seed, the same images and the same
thread count on the same CPU give the same weights, bit for bit. Minutes mode depends on speed
and is not reproducible; its record says how many steps it ran.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .handlers import is_depthwise

FINETUNES = ("none", "distill")
DEFAULT_EPOCHS = 2
DEFAULT_LR = 5e-4
DEFAULT_BATCH = 64
TEMPERATURE = 4.0
WARMUP_SHARE = 0.03
PAD_SHARE = 1 / 8  # random-crop padding, a fraction of the image side (4 px for CIFAR's 32)
CURVE_POINTS_PER_EPOCH = 10
# Models with depthwise convolutions train on image batches in channels-last layout on the CPU,
# where oneDNN runs their convolutions faster so (EfficientNet-Lite0; the CIFAR ResNets gain nothing
# measurable and keep the default layout: benchmarks/distill_speed.py). The GPU keeps the default
# layout: unmeasured there.
CHANNELS_LAST_ON_CPU = True


@dataclass
class DistillSettings:
    """How long and how hard to train; ``epochs`` and ``minutes`` exclude each other (neither: DEFAULT_EPOCHS)."""

    epochs: int | None = None
    minutes: float | None = None
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    seed: int = 0
    threads: int = 0  # 0: PyTorch's default (every core)

    def check(self) -> "DistillSettings":
        """Refuse settings that cannot train, in the CLI's terms (BadInput)."""
        if self.epochs is not None and self.minutes is not None:
            raise BadInput("give --finetune-epochs or --finetune-minutes, not both (epochs replay exactly; "
                           "minutes stop when the time is spent)")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 1):
            raise BadInput(f"--finetune-epochs must be a whole number >= 1, got {self.epochs!r}")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise BadInput(f"--finetune-minutes must be a positive number of minutes, got {self.minutes!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise BadInput(f"--finetune-lr must be a positive learning rate (e.g. {DEFAULT_LR}), got {self.lr!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise BadInput(f"--finetune-batch must be a whole number >= 1, got {self.batch!r}")
        return self

    @property
    def planned_epochs(self) -> int | None:
        """Epochs to run, or None when a time budget decides."""
        return None if self.minutes is not None else (self.epochs or DEFAULT_EPOCHS)


@dataclass
class DistillRecord:
    """What a distillation run did, for the report."""

    method: str
    images: int
    batch: int
    lr: float
    optimizer: str
    schedule: str
    temperature: float
    batchnorm: str
    augmentation: str
    seed: int
    device: str
    threads: int
    budget: dict  # {"epochs": N} or {"minutes": M}
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    images_per_second: float = 0.0
    loss_curve: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss"}: mean KL over each stretch

    def as_dict(self) -> dict:
        return asdict(self)


def check_images(images: torch.Tensor, settings: DistillSettings) -> None:
    """Refuse what distillation cannot train on: anything but a batch of images, or fewer images than one
    full batch (every step trains on a whole batch)."""
    if images.dim() != 4:
        raise BadInput(f"--finetune distill trains on images (N, C, H, W); the calibration data has shape "
                       f"{tuple(images.shape)}")
    if len(images) < settings.batch:
        raise BadInput(f"--finetune distill needs at least {settings.batch} calibration images (one batch of "
                       f"--finetune-batch {settings.batch}), got {len(images)} after dropping near-copies of the "
                       f"evaluation images; give more images or a smaller --finetune-batch")


def check_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters distillation updates; BadInput when there are none."""
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise BadInput("--finetune distill needs trainable parameters, and this model has none (no parameters, "
                       "or every one has requires_grad=False); drop --finetune")
    return params


def augment(images: torch.Tensor, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Random crop of each image padded by PAD_SHARE of its side (padding = ``fill`` per channel), then a
    horizontal flip with probability 1/2; the draws come from ``generator`` (CPU) in a fixed order."""
    n, c, h, w = images.shape
    pad = max(1, round(PAD_SHARE * min(h, w)))
    padded = fill.to(images.device, images.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = images
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :])
    return padded[tuple(i.to(images.device) for i in index)]


def training_layout(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.memory_format:
    """Channels-last for a model with depthwise convolutions on image batches on the CPU
    (CHANNELS_LAST_ON_CPU), else the default layout. Only the summation order differs: the trained
    model is the other layout's to rounding, not bit for bit."""
    if (CHANNELS_LAST_ON_CPU and images.dim() == 4 and device.type == "cpu"
            and any(is_depthwise(m) for m in model.modules())):
        return torch.channels_last
    return torch.contiguous_format


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = TEMPERATURE) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 (gradient scale independent of T)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def learning_rate(base: float, progress: float) -> float:
    """Linear warm-up over WARMUP_SHARE of training, then cosine decay to zero; ``progress`` in [0, 1]."""
    if progress < WARMUP_SHARE:
        return base * (progress + 1e-3) / WARMUP_SHARE
    done = (progress - WARMUP_SHARE) / (1 - WARMUP_SHARE)
    return base * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _batches(count: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of whole batches, epoch after epoch, each epoch a fresh shuffle (the last partial batch dropped)."""
    while True:
        order = torch.randperm(count, generator=generator)
        for b in range(count // batch):
            yield order[b * batch:(b + 1) * batch]


@contextlib.contextmanager
def _reproducible(seed: int, threads: int, device: torch.device) -> Iterator[None]:
    """Seeded global RNGs (restored after), deterministic algorithms, ``threads`` intra-op threads."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # CUDA kernels without a deterministic version warn instead of stopping the build.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn)


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, settings: DistillSettings,
            device: str | torch.device = "cpu", fill: Sequence[float] | None = None,
            progress: Callable[..., None] | None = None) -> DistillRecord:
    """Train ``student`` in place to match ``teacher``'s outputs on ``images`` (float NCHW, preprocessed,
    unlabelled); ``teacher`` is left unchanged. ``fill`` is the padding value per channel in the images'
    normalised space (default 0). ``progress(n, status=...)`` is called once per step.
    """
    settings.check()
    check_images(images, settings)
    device = torch.device(device)
    check_trainable(student)
    layout = training_layout(student, images, device)
    student.to(device, memory_format=layout)
    if next(teacher.parameters()).device != device or layout != torch.contiguous_format:
        teacher = copy.deepcopy(teacher).to(device, memory_format=layout)  # the caller's teacher stays as it is
    teacher.eval()
    fill = torch.zeros(images.shape[1]) if fill is None else torch.tensor(list(fill), dtype=torch.float32)
    epochs = settings.planned_epochs
    record = DistillRecord(
        "distill", len(images), settings.batch, settings.lr, "AdamW (betas 0.9, 0.999; no weight decay)",
        f"linear warm-up over {WARMUP_SHARE:.0%} of training, then cosine to 0", TEMPERATURE,
        "frozen running statistics (eval mode; scale and shift trained)",
        f"random crop, padding {PAD_SHARE:g} of the side (black), horizontal flip p=0.5", settings.seed, str(device),
        torch.get_num_threads() if not settings.threads else settings.threads,
        {"epochs": epochs} if epochs is not None else {"minutes": settings.minutes})
    steps_per_epoch = len(images) // settings.batch  # whole batches: every step weighs the same
    total = None if epochs is None else epochs * steps_per_epoch
    budget = None if settings.minutes is None else 60.0 * settings.minutes
    stretch = max(1, steps_per_epoch // CURVE_POINTS_PER_EPOCH)
    student.eval()
    with _reproducible(settings.seed, settings.threads, device):
        optimizer = torch.optim.AdamW(check_trainable(student), lr=settings.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(settings.seed)
        start = time.perf_counter()
        losses: list[float] = []
        for index in _batches(len(images), settings.batch, generator):
            done = len(losses) / total if total is not None else (time.perf_counter() - start) / budget
            if done >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings.lr, done)
            batch = augment(images[index], generator, fill).to(device, memory_format=layout)
            with torch.no_grad():
                target = teacher(batch)
            loss = distillation_loss(student(batch), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step = len(losses)
            if step % stretch == 0:
                record.loss_curve.append({"step": step, "epoch": round(step / steps_per_epoch, 4),
                                          "loss": sum(losses[-stretch:]) / stretch})
            if progress:
                rate = step * settings.batch / max(time.perf_counter() - start, 1e-9)
                progress(1, status=f"epoch {step / steps_per_epoch:.2f}, loss {loss.item():.4f}, {rate:,.0f} img/s")
        record.seconds = time.perf_counter() - start
    student.to(memory_format=torch.contiguous_format)  # what safetensors and the exporters expect
    record.steps = len(losses)
    record.epochs = round(record.steps / steps_per_epoch, 4)
    record.images_per_second = record.steps * settings.batch / record.seconds if record.seconds else 0.0
    if record.steps % stretch:
        tail = losses[-(record.steps % stretch):]
        record.loss_curve.append({"step": record.steps, "epoch": record.epochs, "loss": sum(tail) / len(tail)})
    return record
