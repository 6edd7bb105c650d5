"""Shared fixtures: the real data in ../shared/data and a small model zoo used by every test file."""
from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from foldship.data import load_images
from foldship.models import load_model
from foldship.models.spec import Preprocessing

# Under pytest-xdist (make test) each worker process is one of several sharing the cores: one thread each, for
# PyTorch, for ONNX Runtime (which follows PyTorch's count) and for the CLI processes the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FOLDSHIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
CKPT = SHARED / "checkpoints" / "cifar10_resnet_akamaster"
RESNET20 = CKPT / "resnet20-12fca82f.th"
RESNET56 = CKPT / "resnet56-4bfd9763.th"
CIFAR_LOSSLESS = SHARED / "cifar10" / "cifar10_test_first1000_lossless.npz"
CIFAR_JPEG = SHARED / "cifar10" / "cifar10_test_10k_from_jpeg.npz"

# What reads ../shared/data: these constants, helpers and fixtures, and anything that uses them.
SHARED_NAMES = {"SHARED", "CKPT", "RESNET20", "RESNET56", "CIFAR_LOSSLESS", "CIFAR_JPEG", "cifar_eval", "resnet20",
                "resnet56", "run_cli", "invoke_cli", "cli_command"}


def _names_used(code, found: set) -> set:
    """Global names a function's code (and the code nested in it) refers to."""
    found.update(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            _names_used(const, found)
    return found


def _reads_shared_data(item) -> bool:
    """Whether the test, one of its fixtures, or a module-level function they call names shared data."""
    if SHARED_NAMES & set(getattr(item, "fixturenames", ())):
        return True
    functions = [item.function] + [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    seen, names = set(), set()
    while functions:
        fn = functions.pop()
        fn = getattr(getattr(fn, "hypothesis", None), "inner_test", fn)
        if isinstance(fn, type):
            fn = fn.__init__
        code = getattr(fn, "__code__", None)
        if code is None or code in seen or not getattr(fn, "__module__", "").startswith("tests"):
            continue
        seen.add(code)
        used = _names_used(code, set())
        names |= used
        functions += [fn.__globals__[name] for name in used if callable(fn.__globals__.get(name))]
    return bool(SHARED_NAMES & names)


def pytest_collection_modifyitems(config, items):
    """Without ../shared/data, skip the tests that read it and run the rest."""
    if RESNET20.exists():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED}; this test needs ../shared/data beside the checkout")
    for item in items:
        if not hasattr(item, "function") or _reads_shared_data(item):
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def collector_sees_only_this_module():
    """Take every object alive when a test module starts (the imports: torch, ONNX, ~460,000 objects after
    collection; what earlier modules left in caches) out of the garbage collector's sight. Each latency
    measurement calls gc.collect() before it reads its memory baseline, and walking those objects cost ~0.2 s
    a call, 34 s a suite; this module's own objects are collected as before."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session):
    gc.unfreeze()  # the interpreter's last collection at exit sees everything again


@pytest.fixture(scope="session")
def cifar_eval():
    """The 1,000 lossless CIFAR-10 test images, normalised as the ResNet trainer did."""
    return load_images(CIFAR_LOSSLESS, Preprocessing(), num_classes=10)


@pytest.fixture(scope="session")
def resnet20():
    return load_model("cifar_resnet20", RESNET20)


@pytest.fixture(scope="session")
def resnet56():
    return load_model("cifar_resnet56", RESNET56)


@pytest.fixture(scope="session")
def folded_resnet56(resnet56):
    """The trained ResNet-56 folded at ratio 0.5 (paper defaults: every group, no repair)."""
    from foldship.compress import compress

    return compress(resnet56.model, resnet56.example_inputs(2), method="fold", ratio=0.5)


class ResidualConcatNet(nn.Module):
    """A small CNN with every construct the engine must couple: residual add, concat, BN, bias, linear."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(width)
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, width // 2, 1)
        self.mix = nn.Conv2d(width + width // 2, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        s = torch.relu(self.stem_bn(self.stem(x)))
        s = torch.relu(s + self.b_bn(self.b(torch.relu(self.a_bn(self.a(s))))))
        cat = torch.cat([torch.relu(self.left(s)), torch.relu(self.right(s))], dim=1)
        return self.head(torch.relu(self.mix(cat)).mean((2, 3)))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so that merges that get BN wrong show up."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision resnet18 in its CIFAR form (3x3 stem, no max-pool), as in the papers."""
    from foldship.models.cifar_resnet import cifar_resnet18 as build

    return build(num_classes).eval()


@pytest.fixture(scope="session")
def zoo():
    """Small models by name: each a (model, example input) pair with random weights."""
    torch.manual_seed(0)
    from foldship.models.cifar_resnet import CifarResNet

    return {
        "residual_concat": (randomise_bn(ResidualConcatNet()), torch.randn(2, 3, 8, 8)),
        "cifar_resnet20": (randomise_bn(CifarResNet(20)), torch.randn(2, 3, 32, 32)),
        "cifar_resnet18": (randomise_bn(cifar_resnet18()), torch.randn(2, 3, 32, 32)),
    }


def write_config(tmp_path_factory, settings: dict) -> Path:
    """``settings`` as a YAML build config in a fresh temporary folder."""
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "foldship", *args]


def run_cli(*args: str, cwd: Path | None = None, **options) -> subprocess.CompletedProcess:
    """Run the real ``foldship`` CLI in a subprocess and capture its output (``options`` go to subprocess.run)."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd or ROOT, timeout=900, **options)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the ``foldship`` CLI in this process, as ``python -m foldship`` would, without paying ~6 s of imports.

    The exit status is the code the CLI exits with (1 with a traceback for an uncaught exception, as Python
    does); stdout and stderr are captured. The process-wide state the CLI sets (the SIGTERM handler, the working
    folder, PyTorch's thread count) is put back afterwards. Tests about the process itself (signals, resource limits) use ``run_cli``.
    """
    from foldship.cli import app

    import torch

    stdout, stderr = io.StringIO(), io.StringIO()
    handler, cwd, threads = signal.getsignal(signal.SIGTERM), os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                app(args=list(args), prog_name="foldship")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - an uncaught error ends the real process with a traceback and 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, handler)
        torch.set_num_threads(threads)  # --threads sets PyTorch's process-wide pool
    # Colour codes appear only if the CLI was first imported with a terminal on stderr (pytest -s).
    return subprocess.CompletedProcess(["foldship", *args], code, ANSI_ESCAPE.sub("", stdout.getvalue()),
                                       ANSI_ESCAPE.sub("", stderr.getvalue()))


def duplicate_pairs(view, input_pairs: dict) -> tuple[list[int], list[int]]:
    """Channel j pairs with j + n/2, except where an option-A shortcut routes the stream.

    There, pass-through slots pair as their input channels paired in the previous stream and
    padding slots pair among themselves, so the duplicated model folds back under the "mirror"
    rule. ``input_pairs`` carries each shortcut's input pairing from stream to stream.
    """
    from foldship.models.cifar_resnet import PadShortcut

    half = view.size // 2
    first, second = list(range(half)), list(range(half, 2 * half))
    for item in view.weighted_items:
        if not isinstance(item.module, PadShortcut):
            continue
        module = item.module
        if item.axis == "out":
            slot_to_channel = {int(idx): c for c, idx in enumerate(item.table[:, 0].tolist())}
            reading = {int(module.gather_index[slot]): slot_to_channel[slot]
                       for slot in slot_to_channel if module.keep_mask[slot] > 0}
            pads = [slot_to_channel[slot] for slot in sorted(slot_to_channel) if module.keep_mask[slot] == 0]
            pairs = input_pairs[module]
            first = [reading[a] for a, _ in pairs] + pads[:len(pads) // 2]
            second = [reading[b] for _, b in pairs] + pads[len(pads) // 2:]
    for item in view.weighted_items:
        if isinstance(item.module, PadShortcut) and item.axis == "in":
            input_pairs[item.module] = [(int(item.table[a, 0]), int(item.table[b, 0])) for a, b in zip(first, second)]
    return first, second


def duplicate_channels(model: nn.Module, example) -> nn.Module:
    """Make every group's channel j an exact copy of channel j + n/2, for any architecture.

    Producer rows, biases and BN entries of the second half are set equal to the first half and
    each consumer column pair is replaced by its mean, so the model computes exactly what a
    half-width model would. Folding it at ratio 0.5 must then reproduce its outputs.

    The pairs are written through the engine's own group tables and slices, so this reaches every
    architecture but cannot catch an indexing error the engine makes: tests/test_engine.py builds
    duplicates by hand (``widen``) and checks merges against cluster means and sums computed there.
    """
    from foldship.compress.groups import DependencyAdapter, output_layers
    from foldship.compress.handlers import MEAN, UnsupportedItem, item_slices

    with torch.no_grad():
        adapter = DependencyAdapter(model, example, output_layers(model, example))
        input_pairs: dict = {}
        for view in adapter.groups():
            pairs = duplicate_pairs(view, input_pairs)
            try:  # groups folding leaves whole (e.g. LayerNorm-coupled streams) stay as they are
                slices = [(item, s) for item in view.weighted_items for s in item_slices(item)]
            except UnsupportedItem:
                continue
            for item, s in slices:
                moved = s.tensor.movedim(s.dim, 0)
                first, second = item.table[pairs[0]].flatten(), item.table[pairs[1]].flatten()
                if s.merge == MEAN:
                    moved[second] = moved[first]
                else:
                    mean = (moved[first] + moved[second]) / 2
                    moved[first] = mean
                    moved[second] = mean
    return model
