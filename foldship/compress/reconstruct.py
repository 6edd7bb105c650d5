"""Layer-wise reconstruction: re-solve each layer's weights so its outputs on unlabelled images
match the uncompressed model's (He et al. 2017, "Channel Pruning for Accelerating Very Deep
Neural Networks"; ThiNet), for folding and pruning alike. docs/recovery-reconstruct.md has the maths.

Every group edit is a linear map on the producers' output channels (``ChannelMap``): folding
replaces a cluster by the mean of its members (divided by the BN std first under Fold-AR),
pruning selects. So a compressed layer L should compute, on its own (compressed) input x', the
pre-activation (pre-BN) target M_L (W x + b) of the uncompressed layer on the uncompressed
input x. Layers are solved in forward order, each from the inputs of the compressed model as
already reconstructed, so errors do not accumulate:

    W' = argmin ||X' W'^T - Y||^2 + lam ||W' - W0||^2 = (G + lam I)^-1 (X'^T Y + lam W0^T)

with X' the input patches at sampled positions (bias: a column of ones), Y the targets, G = X'^T X'
accumulated in float64, W0 the compressed weights, lam = ``ridge`` x mean(diag G). Pulling towards
W0 (not 0) leaves directions the images do not excite as folding or pruning set them. A grouped
convolution is one such solve per convolution group: a depthwise one solves each channel's filter
on its own channel (a 1x1 depthwise filter: one scale per channel).

Two passes over the calibration images: the uncompressed model, in batches, stores every layer's
target at ``positions_per_image`` sampled output positions per image; then the compressed model
runs once on all images at batch N, and a hook on each layer solves it just before it runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from .groups import GroupView, trace_layers
from .repairs import Statistics, apply_statistics, input_moments
from .slices import is_depthwise

POSITIONS_PER_IMAGE = 32  # sampled output positions per image and layer (all of them when fewer)
RIDGE = 1e-3  # lam = RIDGE x the mean diagonal of the Gram matrix (the mean squared input)
EXACT = 1e-10  # relative error below which a layer is already exact and keeps its weights
REFERENCE_BATCH = 64  # images per batch of the uncompressed pass


@dataclass
class ChannelMap:
    """How a compressed layer's outputs derive from the uncompressed layer's: compressed output
    ``row[i]`` gains ``weight[i]`` x uncompressed output i (``row[i]`` = -1: output i was removed)."""

    row: torch.Tensor  # (n,) int64
    weight: torch.Tensor  # (n,) float64

    @classmethod
    def identity(cls, n: int) -> "ChannelMap":
        return cls(torch.arange(n), torch.ones(n, dtype=torch.float64))

    def then(self, later: "ChannelMap") -> "ChannelMap":
        """This map followed by ``later`` (a map on this map's outputs)."""
        alive = self.row >= 0
        row = torch.where(alive, later.row[self.row.clamp_min(0)], -1)
        return ChannelMap(row, self.weight * torch.where(alive, later.weight[self.row.clamp_min(0)], 0.0))

    def matrix(self) -> torch.Tensor:
        """(k, n) float64: compressed outputs = matrix @ uncompressed outputs."""
        k = int(self.row.max()) + 1 if len(self.row) else 0
        alive = torch.nonzero(self.row >= 0).flatten()
        dense = torch.zeros(k, len(self.row), dtype=torch.float64)
        dense[self.row[alive], alive] = self.weight[alive]
        return dense


def _has_outputs(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))


def record_group_maps(view: GroupView, maps: dict[nn.Module, ChannelMap], labels: torch.Tensor | None,
                      reps: list[int] | None, drop: list[int], divisors: dict[nn.Module, torch.Tensor]) -> None:
    """Add one group edit (before ``view.remove(drop)``) to the output map of every conv/linear
    layer whose outputs the group indexes: fold (``labels``, cluster representatives ``reps``)
    maps each channel to its representative with weight 1/|cluster| (/ the Fold-AR divisor of that
    output); pruning (``labels`` None) keeps or removes it."""
    seen = set()
    for item in view.weighted_items:
        module = item.module
        if not _has_outputs(module) or module in seen or not (item.axis == "out" or is_depthwise(module)):
            continue
        seen.add(module)
        size = module.weight.shape[0]
        step = ChannelMap.identity(size)
        table = item.table.cpu()
        if labels is not None:
            rep_of = torch.tensor(reps)[labels.cpu()]
            share = (1.0 / torch.bincount(labels.cpu()).to(torch.float64))[labels.cpu()]
            step.row[table.flatten()] = table[rep_of].flatten()
            step.weight[table.flatten()] = share[:, None].expand(table.shape).flatten()
            if module in divisors:
                step.weight /= divisors[module].cpu().to(torch.float64)
        removed = torch.zeros(size, dtype=torch.bool)
        removed[table[drop].flatten()] = True
        if labels is None:
            step.row[removed] = -1
            step.weight[removed] = 0.0
        renumber = torch.cumsum(~removed, 0) - 1  # removal shifts the kept outputs down
        step.row = torch.where(step.row >= 0, renumber[step.row.clamp_min(0)], -1)
        maps[module] = maps[module].then(step) if module in maps else step


@dataclass
class LayerRecord:
    name: str
    kind: str  # conv, grouped conv, depthwise conv, linear
    unknowns: int  # weights solved per output (bias included)
    positions: int  # rows of the solve: images x sampled positions per image
    action: str  # "reconstructed", or why the layer kept its weights
    error_before: float | None = None  # ||X' W0^T - Y||^2 / ||Y||^2 on the calibration images
    error_after: float | None = None
    seconds: float = 0.0


@dataclass
class Reconstruction:
    images: int
    positions_per_image: int
    ridge: float
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        def rounded(record: LayerRecord) -> dict:
            row = asdict(record)
            for key in ("error_before", "error_after"):
                row[key] = None if row[key] is None else float(f"{row[key]:.6g}")
            row["seconds"] = round(row["seconds"], 3)
            return row

        return {"images": self.images, "positions_per_image": self.positions_per_image, "ridge": self.ridge,
                "error": "relative squared error of each layer's pre-activation outputs on the calibration images",
                "layers_reconstructed": sum(r.action == "reconstructed" for r in self.layers),
                "seconds": round(self.seconds, 3), "layers": [rounded(r) for r in self.layers]}


@dataclass
class _Layer:
    name: str
    module: nn.Module  # in the compressed model
    reference: nn.Module  # in the uncompressed model
    outputs_per_image: int  # spatial positions (conv) or tokens (linear) per image
    skip: str | None = None  # why it is left as it is
    positions: torch.Tensor | None = None  # (N, S) sampled output positions
    targets: list[torch.Tensor] = field(default_factory=list)  # per reference batch: (b, S, k) mapped targets

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    @property
    def unknowns(self) -> int:
        w = self.module.weight
        return w[0].numel() + (self.module.bias is not None)

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.Linear):
            return "linear"
        return "depthwise conv" if is_depthwise(self.module) else "grouped conv" if self.groups > 1 else "conv"


def _plan(model: nn.Module, reference: nn.Module, probe: torch.Tensor) -> list[_Layer]:
    """The conv/linear layers in forward order, with their output positions per image and, for
    those left alone, why (called more than once per forward; first axis not the batch)."""
    order, _ = trace_layers(reference, probe)
    names = {m: n for n, m in reference.named_modules()}
    modules = dict(model.named_modules())
    calls: dict[nn.Module, list[torch.Size]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.setdefault(m, []).append(o.shape)) for m in order]
    try:
        with torch.no_grad():
            reference(probe)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for module in order:
        name = names[module]
        shapes = calls.get(module, [])
        spatial = (shapes[0][2:] if isinstance(module, (nn.Conv1d, nn.Conv2d)) else shapes[0][1:-1]) if shapes else ()
        per_image = math.prod(spatial)
        layer = _Layer(name, modules[name], module, per_image)
        if len(shapes) != 1:
            layer.skip = f"kept: runs {len(shapes)} times per forward"
        elif shapes[0][0] != len(probe):
            layer.skip = "kept: its input's first axis is not the batch"
        layers.append(layer)
    return layers


def minimum_images(layers: list[_Layer], positions_per_image: int = POSITIONS_PER_IMAGE) -> tuple[int, _Layer | None]:
    """Fewest images for which every layer's solve has at least as many positions as unknowns
    per output (the least-squares problem is then determined without the ridge), and the layer
    that needs them."""
    need, worst = 1, None
    for layer in layers:
        if layer.skip is None:
            count = math.ceil(layer.unknowns / min(positions_per_image, layer.outputs_per_image))
            if count > need:
                need, worst = count, layer
    return need, worst


def _patches(layer: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(b, S, D) float64: the input patch of each sampled output position, laid out as the layer's
    flattened weight rows (D = in_channels x kernel size; a linear layer's input features).

    For a convolution this is ``F.unfold`` evaluated at the sampled positions only: one gather
    from the padded input, never the whole unfolded tensor.
    """
    index = positions.to(x.device)
    if isinstance(layer, nn.Linear):
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return torch.gather(flat, 1, index[:, :, None].expand(-1, -1, flat.shape[-1])).to(torch.float64)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    if isinstance(layer, nn.Conv1d):  # as a 2-d convolution of height 1
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    height, width = x.shape[2:]
    out_width = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    rows = (index // out_width) * stride[0]  # (b, S): top-left corner of each patch
    cols = (index % out_width) * stride[1]
    taps_r = torch.arange(kernel[0], device=x.device) * dilation[0]
    taps_c = torch.arange(kernel[1], device=x.device) * dilation[1]
    where = (rows[:, :, None, None] + taps_r[:, None]) * width + cols[:, :, None, None] + taps_c  # (b, S, kh, kw)
    flat = x.flatten(2)  # (b, C, H W)
    picked = torch.gather(flat, 2, where.flatten(1)[:, None, :].expand(-1, flat.shape[1], -1))  # (b, C, S kh kw)
    b, channels, count = len(x), flat.shape[1], index.shape[1]
    return picked.view(b, channels, count, -1).transpose(1, 2).reshape(b, count, -1).to(torch.float64)


def _outputs(layer: nn.Module, output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(b, S, k) float64: the layer's outputs at the sampled positions."""
    index = positions.to(output.device)
    if isinstance(layer, nn.Linear):
        flat = output.reshape(output.shape[0], -1, output.shape[-1])
    else:
        flat = output.flatten(2).transpose(1, 2)
    return torch.gather(flat, 1, index[:, :, None].expand(-1, -1, flat.shape[-1])).to(torch.float64)


def _sample(generator: torch.Generator, images: int, outputs: int, count: int) -> torch.Tensor:
    """(images, min(count, outputs)) output positions per image, without repeats; all when few."""
    if outputs <= count:
        return torch.arange(outputs).expand(images, -1)
    return torch.rand(images, outputs, generator=generator).topk(count, dim=1).indices


def _collect_targets(reference: nn.Module, layers: list[_Layer], maps: dict[str, ChannelMap],
                     images: torch.Tensor, seed: int, positions_per_image: int) -> None:
    """Pass 1: each layer's uncompressed outputs at sampled positions, mapped as compression mapped
    its outputs (``maps``), batch by batch into ``layer.targets``."""
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    matrices = {layer.name: maps[layer.name].matrix().to(device) for layer in layers if layer.name in maps}
    drawn: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}

    def on_output(layer: _Layer):
        def hook(module, inputs, output):
            positions = _sample(generator, len(output), layer.outputs_per_image, positions_per_image)
            target = _outputs(module, output, positions)
            if layer.name in matrices:
                target = target @ matrices[layer.name].T
            drawn[layer.name].append(positions)
            layer.targets.append(target.to(torch.float32))
        return hook

    hooks = [layer.reference.register_forward_hook(on_output(layer)) for layer in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(images), REFERENCE_BATCH):
                reference(images[start:start + REFERENCE_BATCH].to(device))
    finally:
        for h in hooks:
            h.remove()
    for layer in layers:
        layer.positions = torch.cat(drawn[layer.name])


def _solve(layer: _Layer, x: torch.Tensor, ridge: float) -> LayerRecord:
    """Re-solve one layer from its (compressed-model) input ``x`` on every calibration image."""
    start = time.perf_counter()
    module, groups = layer.module, layer.groups
    record = LayerRecord(layer.name, layer.kind, layer.unknowns, layer.positions.numel(), "reconstructed")
    weight, bias = module.weight, module.bias
    rows, width = weight.shape[0] // groups, weight[0].numel()
    size = layer.unknowns
    gram = torch.zeros(groups, size, size, dtype=torch.float64, device=x.device)
    cross = torch.zeros(groups, size, rows, dtype=torch.float64, device=x.device)
    energy = torch.zeros((), dtype=torch.float64, device=x.device)
    offset = 0
    for target in layer.targets:  # the batches of pass 1
        count = len(target)
        patches = _patches(module, x[offset:offset + count], layer.positions[offset:offset + count])
        patches = patches.reshape(-1, groups, width)
        if bias is not None:
            patches = torch.cat([patches, patches.new_ones(len(patches), groups, 1)], dim=2)
        y = target.to(torch.float64).reshape(-1, groups, rows)
        gram += torch.einsum("pgi,pgj->gij", patches, patches)
        cross += torch.einsum("pgi,pgo->gio", patches, y)
        energy += (y * y).sum()
        offset += count
    w0 = weight.detach().to(torch.float64).reshape(groups, rows, width)
    if bias is not None:
        w0 = torch.cat([w0, bias.detach().to(torch.float64).reshape(groups, rows, 1)], dim=2)
    total = float(energy)

    def error(w: torch.Tensor) -> float:  # ||X W^T - Y||^2 / ||Y||^2 from the accumulated sums
        quadratic = torch.einsum("goi,gij,goj->", w, gram, w) - 2 * torch.einsum("goi,gio->", w, cross)
        return (float(quadratic) + total) / total if total > 0 else 0.0

    record.error_before = error(w0)
    if record.error_before < EXACT:
        record.action = "kept: exact already"
    else:
        energy_per_input = gram.diagonal(dim1=1, dim2=2).mean(1)
        # silent inputs (a group whose patches are all zero): any ridge > 0 then keeps W0
        scale = ridge * torch.where(energy_per_input > 0, energy_per_input, torch.ones_like(energy_per_input))
        eye = torch.eye(size, dtype=torch.float64, device=x.device)
        factor, info = torch.linalg.cholesky_ex(gram + scale[:, None, None] * eye)
        if bool((info != 0).any()):
            record.action = "kept: ill-conditioned solve"
        else:
            w = torch.cholesky_solve(cross + scale[:, None, None] * w0.transpose(1, 2), factor).transpose(1, 2)
            record.error_after = error(w)
            if not math.isfinite(record.error_after) or record.error_after >= record.error_before:
                record.action = "kept: the solve did not lower the error"
            else:
                weight.data.copy_(w[..., :width].reshape(weight.shape))
                if bias is not None:
                    bias.data.copy_(w[..., width].reshape(bias.shape))
    layer.targets = []  # free pass 1's store as soon as the layer is done
    record.seconds = time.perf_counter() - start
    return record


def reconstruct(model: nn.Module, reference: nn.Module, images: torch.Tensor, maps: dict[str, ChannelMap],
                seed: int = 0, positions_per_image: int = POSITIONS_PER_IMAGE, ridge: float = RIDGE,
                statistics: Statistics | None = None, progress: Callable[[int], None] | None = None) -> Reconstruction:
    """Re-solve every conv/linear layer of ``model`` (compressed, in place) in forward order so its
    pre-activation outputs on ``images`` match ``reference``'s (the uncompressed model, same module
    names), mapped by ``maps`` (module name -> ``ChannelMap``; missing: outputs unchanged).

    With ``statistics`` (``bn_input_statistics`` of the uncompressed model, carried through the
    compression), each BN layer's running statistics move by the change measured on its input
    (``apply_statistics``) just before it runs, so the layers after it are solved with it in place.

    BadInput when there are fewer images than ``minimum_images``. Deterministic for a given seed.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    layers = _plan(model, reference, images[:2].to(device))
    need, worst = minimum_images(layers, positions_per_image)
    if len(images) < need:
        per_image = min(positions_per_image, worst.outputs_per_image)
        raise BadInput(f"repair reconstruct needs at least {need} calibration images for this model ({worst.name} "
                       f"solves {worst.unknowns} weights per output from {per_image} position(s) per image); got "
                       f"{len(images)}; give more with --calibration-data (a build takes up to calibration_count of them)")
    result = Reconstruction(len(images), positions_per_image, ridge)
    active = [layer for layer in layers if layer.skip is None]
    _collect_targets(reference, active, maps, images, seed, positions_per_image)
    records = {layer.name: LayerRecord(layer.name, layer.kind, layer.unknowns, 0, layer.skip)
               for layer in layers if layer.skip is not None}

    def before_layer(layer: _Layer):
        def hook(module, inputs):
            records[layer.name] = _solve(layer, inputs[0], ridge)
            if progress:
                progress(1)
        return hook

    def before_norm(norm: nn.Module, inputs):  # the layers before it are final: move its statistics now
        mean, var = input_moments(inputs[0])
        apply_statistics(norm, mean, var, statistics[norm])

    hooks = [layer.module.register_forward_pre_hook(before_layer(layer)) for layer in active]
    hooks += [norm.register_forward_pre_hook(before_norm) for norm in (statistics or {})]
    try:
        with torch.no_grad():
            model(images.to(device))  # pass 2: every image at once, each layer solved just before it runs
    finally:
        for h in hooks:
            h.remove()
    result.layers = [records[layer.name] for layer in layers]
    result.seconds = time.perf_counter() - start
    return result
