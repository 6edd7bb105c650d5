"""Property tests on random small CNN and MLP graphs with residual adds and concatenations:
compression at any ratio gives a model that runs and exports; a ratio too small to drop a
channel (k = n) changes nothing; duplicated channels fold back without any change in output."""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foldship.compress import compress
from foldship.compress.engine import merge_clusters
from foldship.compress.groups import DependencyAdapter, output_layers
from foldship.compress.handlers import foldability
from foldship.exporters import export_onnx
from foldship.validators import count_params, evaluate_onnx

from .conftest import duplicate_channels

# Deterministic (same examples on every run, no example database), few and tiny examples.
FEW = settings(max_examples=8, deadline=None, derandomize=True, database=None)


@dataclass(frozen=True)
class NetSpec:
    mlp: bool  # Linear + BatchNorm1d on flattened 3x4x4 inputs, else 3x3 Conv + BatchNorm2d
    width: int  # the stream every block reads and writes
    blocks: tuple[tuple[str, int, int], ...]  # (plain | residual | concat, inner width, second branch width)
    norm: bool
    classes: int
    seed: int


class Block(nn.Module):
    """plain: two layers; residual: the same plus the input; concat: two branches joined and mixed."""

    def __init__(self, kind: str, width: int, a: int, b: int, spec: NetSpec):
        super().__init__()
        layer = nn.Linear if spec.mlp else (lambda i, o: nn.Conv2d(i, o, 3, padding=1))
        norm = (nn.BatchNorm1d if spec.mlp else nn.BatchNorm2d) if spec.norm else (lambda n: nn.Identity())
        self.kind = kind
        if kind == "concat":
            self.left, self.right, self.mix, self.mix_norm = layer(width, a), layer(width, b), layer(a + b, width), norm(width)
        else:
            self.first, self.first_norm, self.second, self.second_norm = layer(width, a), norm(a), layer(a, width), norm(width)

    def forward(self, x):
        if self.kind == "concat":
            return F.relu(self.mix_norm(self.mix(torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1))))
        y = self.second_norm(self.second(F.relu(self.first_norm(self.first(x)))))
        return F.relu(x + y) if self.kind == "residual" else F.relu(y)


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.mlp = spec.mlp
        self.stem = nn.Linear(48, spec.width) if spec.mlp else nn.Conv2d(3, spec.width, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(kind, spec.width, a, b, spec) for kind, a, b in spec.blocks))
        self.head = nn.Linear(spec.width, spec.classes)
        for m in self.modules():  # trained-looking BN statistics, so a merge that gets BN wrong shows
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x.flatten(1) if self.mlp else x)))
        return self.head(x if self.mlp else x.mean((2, 3)))


even = st.integers(1, 4).map(lambda half: 2 * half)  # even widths, so every channel can have a twin
nets = st.builds(NetSpec, mlp=st.booleans(), width=even,
                 blocks=st.lists(st.tuples(st.sampled_from(["plain", "residual", "concat"]), even, even),
                                 min_size=1, max_size=3).map(tuple),
                 norm=st.booleans(), classes=st.integers(2, 5), seed=st.integers(0, 2**16))
INPUT = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT)


@FEW
@given(spec=nets, ratio=st.floats(0.01, 0.99), method=st.sampled_from(["fold", "prune-l2"]))
def test_any_ratio_runs_and_exports(spec, ratio, method):
    model = RandomNet(spec)
    small = compress(model, INPUT, method=method, ratio=ratio, restarts=2)
    got = outputs(small)
    assert got.shape == (2, spec.classes) and bool(torch.isfinite(got).all())
    assert count_params(small) <= count_params(model)
    with tempfile.TemporaryDirectory() as folder:
        artifact = export_onnx(small, INPUT, Path(folder) / "small.onnx", exporter="legacy")
        onnx_logits = evaluate_onnx(artifact.path, INPUT).logits
    np.testing.assert_allclose(onnx_logits, got.numpy(), rtol=1e-4, atol=1e-5)


@FEW
@given(spec=nets)
def test_merging_singleton_clusters_changes_no_weight(spec):
    """Every group merged with each channel its own cluster (the merge rules of every module type
    the net holds: producer rows averaged, consumer columns summed, BN statistics, reroutes) must
    leave every tensor as it was: a mean or sum of one member is that member."""
    model = RandomNet(spec).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = outputs(model)
    merged = 0
    with torch.no_grad():
        for view in DependencyAdapter(model, INPUT, output_layers(model, INPUT)).groups():
            if foldability(view) is None:
                assert merge_clusters(view, torch.arange(view.size)) == []  # nothing to remove
                merged += 1
    assert merged > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(model), reference)


@FEW
@given(spec=nets)
def test_duplicated_channels_fold_losslessly(spec):
    wide = duplicate_channels(RandomNet(spec), INPUT)
    folded = compress(copy.deepcopy(wide), INPUT, method="fold", ratio=0.5, restarts=2)
    assert count_params(folded) < count_params(wide)
    reference = outputs(wide)
    assert (outputs(folded) - reference).abs().max() <= 1e-4 * max(reference.abs().max(), 1e-3)
