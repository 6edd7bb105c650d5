"""Structured compression of every coupled channel group: model folding or magnitude pruning.

One loop serves both methods (so they give identical architectures): for each fresh group,
pick the width k, then either cluster the channels and merge each cluster into its first member
(fold), or keep the k channels with the largest scores (prune, ``channel_scores``); finally remove the other
channels from every coupled tensor.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import BadInput
from ..models.blocks import remove_blocks
from ..models.rewrites import apply_rewrites
from .groups import DependencyAdapter, output_layers
from .handlers import MEAN, foldability, handler_for, item_slices
from .kmeans import cluster, inertia, special_partition, squared_norm
from .reconstruct import ChannelMap, Reconstruction, reconstruct, record_group_maps
from .repairs import (Statistics, bn_input_statistics, bn_statistics, check_repair, norm_pairs, normalise_producers,
                      recalibrate_bn, repair_steps, scale_gammas, statistics_for, variance_factors)
from .views import GroupView
from .widths import WidthLedger, check_ratio, check_round_to, kept_width


@dataclass(frozen=True)
class Method:
    """How one method edits a group: fold merges clusters, pruning keeps the channels with the largest scores."""

    action: str  # a compressed group's record: "folded" or "pruned"
    norm: int  # p of the Lp magnitude scores (``channel_scores``; fold's magnitude start reads them too)
    merges: bool  # channels are merged into cluster representatives (fold), not only removed


METHODS = {"fold": Method("folded", 2, True), "prune-l1": Method("pruned", 1, False),
           "prune-l2": Method("pruned", 2, False)}
GROUP_POLICIES = ("all", "inner")


@dataclass
class GroupRecord:
    name: str
    kind: str
    width: int
    kept: int
    action: str  # "folded", "pruned", or why it was left whole
    weight_error: float | None = None  # ||W - P W||^2 on the group's features
    relative_error: float | None = None
    repair: str | None = None  # on a compressed group: the repair applied, or why it is not applicable
    width_note: str | None = None  # why the width is wider than the ratio and round_to give (option-A room)


@dataclass
class CompressionResult:
    model: nn.Module
    method: str
    ratio: float
    seed: int
    group_policy: str
    repair: str = "none"
    groups: list[GroupRecord] = field(default_factory=list)
    seconds: float = 0.0
    rewritten_modules: int = 0  # modules swapped for an equivalent foldable one (see models/rewrites.py)
    clusters: dict[str, torch.Tensor] = field(default_factory=dict)  # fold: each folded group's cluster labels
    # each compressed conv/linear layer's output map (module name -> map; see reconstruct.ChannelMap)
    channel_maps: dict[str, ChannelMap] = field(default_factory=dict)
    reconstruction: Reconstruction | None = None
    removed_blocks: list[str] = field(default_factory=list)  # residual blocks replaced by the identity (depth)

    @property
    def residual_streams(self) -> str:
        streams = [g for g in self.groups if g.kind == "stream"]
        if not streams:
            return "none"
        if all(g.action in ("folded", "pruned") for g in streams):
            return "compressed"
        return "kept whole" if not any(g.action in ("folded", "pruned") for g in streams) else "partly compressed"

    def summary(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "seed": self.seed, "groups_policy": self.group_policy,
                "repair": self.repair,
                "residual_streams": self.residual_streams, "seconds": round(self.seconds, 3),
                "rewritten_modules": self.rewritten_modules, "removed_blocks": self.removed_blocks,
                "groups": [asdict(g) for g in self.groups],
                "reconstruction": self.reconstruction.summary() if self.reconstruction else None}


def group_features(view: GroupView) -> torch.Tensor:
    """(n, d) matrix: row i holds every clustering feature of channel i, group axis first."""
    blocks = []
    for item in view.weighted_items:
        for s in item_slices(item):
            if s.feature:
                blocks.append(_gather(s.tensor, s.dim, item.table))
    return torch.cat(blocks, dim=1)


def producer_rows(view: GroupView, items: Sequence | None = None) -> torch.Tensor:
    """(n, d) matrix of the producers' flattened filters (no BN, bias or consumers), group axis first."""
    rows = [_gather(s.tensor, s.dim, item.table) for item in (items or view.weighted_items)
            for s in item_slices(item) if s.producer]
    return torch.cat(rows, 1)


def channel_scores(view: GroupView, p: int) -> torch.Tensor:
    """Each channel's magnitude score (pruning keeps the largest; fold's magnitude start uses them).

    A conv group: the Lp norm of the root producer's flattened filter (docs/method.md section 7). A group
    a Linear layer produces (transformer MLPs, attention heads): the Lp norm of the consumers'
    columns (down_proj / o_proj / output.dense), FLAP's rule for LLaMA models; docs/engine.md ("How
    groups are scored") says why and names the benchmark that compares it with the producer's rows.
    """
    consumers = [item for item in view.weighted_items if item.axis == "in"]
    if isinstance(view.items[0].module, nn.Linear) and consumers:
        columns = [_gather(s.tensor, s.dim, item.table) for item in consumers for s in item_slices(item)]
        return torch.linalg.vector_norm(torch.cat(columns, 1), ord=p, dim=1)
    return torch.linalg.vector_norm(producer_rows(view, view.items[:1]), ord=p, dim=1)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores (ties: lower index first), sorted."""
    order = torch.argsort(-scores.detach().cpu(), stable=True)  # stable: equal scores keep index order
    return sorted(order[:k].tolist())


def _gather(tensor: torch.Tensor, dim: int, table: torch.Tensor) -> torch.Tensor:
    n, e = table.shape
    moved = tensor.movedim(dim, 0)
    return moved[table.flatten().to(tensor.device)].reshape(n, e, *moved.shape[1:]).reshape(n, -1).to(torch.float64)


def representatives(labels: torch.Tensor) -> list[int]:
    """The first member of each cluster, in cluster order."""
    first = torch.full((int(labels.max()) + 1,), len(labels), dtype=torch.long)
    return first.scatter_reduce_(0, labels.cpu(), torch.arange(len(labels)), reduce="amin").tolist()


def _merge_rows(tensor: torch.Tensor, dim: int, table: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                reps: list[int], mean: bool) -> None:
    """Write each cluster's sum (or mean) of its members' slices of ``tensor`` into its representative's slice."""
    rows = _gather(tensor, dim, table)
    merged = torch.zeros(len(reps), rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(
        0, labels.to(rows.device), rows)  # cluster sums: O(n d), not a dense (k x n) product
    if mean:
        merged /= counts.to(rows.device)[:, None]
    moved = tensor.movedim(dim, 0)
    target = table[reps].flatten().to(tensor.device)
    moved[target] = merged.reshape(len(target), *moved.shape[1:]).to(tensor.dtype)


def merge_clusters(view: GroupView, labels: torch.Tensor) -> list[int]:
    """Textbook merge into each cluster's first member; returns the channels to remove."""
    counts = torch.bincount(labels).to(torch.float64)
    reps = representatives(labels)
    rep_of = torch.tensor(reps)[labels]
    for item in view.weighted_items:
        for s in item_slices(item):
            _merge_rows(s.tensor, s.dim, item.table, labels, counts, reps, s.merge == MEAN)
        handler_for(item.module).reroute(item, rep_of)
    return sorted(set(range(len(labels))) - set(reps))


def carry_statistics(view: GroupView, statistics: Statistics, labels: torch.Tensor | None, drop: list[int]) -> None:
    """Apply one group's edit to per-channel BN statistics held outside the model (``bn_statistics``):
    fold's cluster means at each representative (``labels``; None when pruning), then the removal of ``drop``."""
    counts = torch.bincount(labels).to(torch.float64) if labels is not None else None
    reps = representatives(labels) if labels is not None else None
    for module, table in {item.module: item.table for item in view.weighted_items if item.module in statistics}.items():
        vectors = [v.clone() for v in statistics[module]]
        if labels is not None:
            for v in vectors:
                _merge_rows(v, 0, table, labels, counts, reps, mean=True)
        removed = set(table[drop].flatten().tolist())
        keep = torch.tensor([i for i in range(len(vectors[0])) if i not in removed], dtype=torch.long)
        statistics[module] = tuple(v[keep.to(v.device)] for v in vectors)


def fixed_blocks(view: GroupView) -> list[list[int]]:
    """Channels the group's modules tie together (each module's handler says which: an option-A
    shortcut's "mirror" rule, docs/method.md section 3); they always share one cluster."""
    return [block for item in view.weighted_items for block in handler_for(item.module).fixed_blocks(item)]


def multiple_with_room(n: int, k: int, blocks: list[list[int]], round_to: int) -> tuple[int, str | None]:
    """The width of an option-A stream of ``n`` channels folded to ``k`` (a multiple of ``round_to``),
    widened to the next multiple with room for its pass-through ``blocks`` plus one cluster for the
    padding slots, and why (None: k already has room). The rule promises a multiple, not the ratio:
    refusing would leave the user no multiple to ask for, while raw widths (round_to 1) still refuse."""
    tied = sum(len(b) for b in blocks)
    room = len(blocks) + (1 if tied < n else 0)
    if k >= room:
        return k, None
    wider = min(-(-room // round_to) * round_to, n)
    return wider, (f"{len(blocks)} pass-through clusters need width >= {room}: widened from {k} to the next "
                   f"multiple of {round_to}, {wider}")


class ShortcutTooNarrow(BadInput):
    """A stream routed by option-A shortcuts folded to no more clusters than its pass-through slots
    need: every narrower width fails too, and narrowing the stream feeding it makes room."""


def split_blocks(features: torch.Tensor, blocks: list[list[int]], extra: int, seed: int,
                 restarts: int) -> list[list[int]]:
    """``blocks`` split into ``extra`` more parts, one split at a time where it lowers the weight error most.

    A stream can need more clusters than its option-A blocks and padding slots give (its input stream
    folded hard, itself lightly). Every part still holds pass-through slots that read one input
    channel, so the shortcut stays a 0/1 gather; two output channels then read the same input channel.
    """
    def best_split(block: list[int], parts: int) -> tuple[list[list[int]], float]:
        if parts == len(block):
            return [[c] for c in block], 0.0
        result = cluster(features[block], parts, seed=seed, restarts=restarts)
        return [[c for c, label in zip(block, result.labels.tolist()) if label == p] for p in range(parts)], \
            result.inertia

    current = [([block], inertia(features[block], torch.zeros(len(block), dtype=torch.long), 1)) for block in blocks]
    for _ in range(extra):
        candidates = [(current[b][1] - split[1], -b, split) for b, split in
                      ((b, best_split(block, len(current[b][0]) + 1)) for b, block in enumerate(blocks)
                       if len(current[b][0]) < len(block))]
        _, negative_b, split = max(candidates, key=lambda c: c[:2])  # largest gain; ties: the first block
        current[-negative_b] = split
    return [part for parts, _ in current for part in parts]


def fold_labels(features: torch.Tensor, k: int, scores: torch.Tensor, blocks: list[list[int]],
                seed: int, restarts: int) -> tuple[torch.Tensor, float]:
    """Cluster labels for a fold to exactly k clusters, honouring fixed blocks, and their weight error.

    Blocks are never merged with each other or with free channels; when k exceeds the blocks plus
    the free channels, blocks are split (``split_blocks``).
    """
    n = features.shape[0]
    tied = {c for b in blocks for c in b}
    free = [c for c in range(n) if c not in tied]
    if k > len(blocks) + len(free):
        blocks = split_blocks(features, blocks, k - len(blocks) - len(free), seed, restarts)
    k_free = k - len(blocks)
    if k_free < (1 if free else 0):
        raise ShortcutTooNarrow(f"ratio too high for an option-A shortcut: {len(blocks)} pass-through clusters "
                                f"leave no room in width {k}; use a lower ratio or --groups inner")
    labels = torch.empty(n, dtype=torch.long)
    for b, block in enumerate(blocks):
        labels[block] = b
    if free:
        sub, sub_scores = (features[free], scores[free]) if blocks else (features, scores)  # no copy of W
        starts = ()
        if 1 <= k_free - 1 < len(free):  # magnitude-pruning partition with k_free - 1 kept
            starts = (special_partition(len(free), top_k(sub_scores, k_free - 1)),)
        result = cluster(sub, k_free, seed=seed, restarts=restarts, start_partitions=starts)
        labels[free] = result.labels + len(blocks)
        if not blocks:
            return labels, result.inertia
    return labels, inertia(features, labels, int(labels.max()) + 1)


def repair_note(view: GroupView, method: str, steps: Sequence[str]) -> str:
    """What the repair steps do to one compressed group: the steps that apply, '+'-joined, then why any
    other does not ("none" without steps).

    Fold-AR rescales the BN that alone reads a producer's output; groups with none (transformer
    MLPs and heads, pre-activation streams) are left as plain fold leaves them.
    """
    applied, skipped = [], []
    for step in steps:
        reason = None
        if step == "fold-ar" and not METHODS[method].merges:
            reason = "pruning merges no channels"
        elif step == "fold-ar" and not norm_pairs(view):
            reason = "no BatchNorm follows a producer"
        elif step == "bn-recalibrate" and not any(isinstance(item.module, nn.modules.batchnorm._BatchNorm)
                                                  for item in view.weighted_items):
            reason = "no BatchNorm in the group"
        if reason is None:
            applied.append(step)
        else:
            skipped.append(f"not applicable: {reason}" if len(steps) == 1 else f"{step} not applicable: {reason}")
    if not skipped:
        return "+".join(applied) or "none"
    return "; ".join(["+".join(applied)] * bool(applied) + skipped)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the GPU when PyTorch sees one, else the CPU; asking for a missing GPU is bad input."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise BadInput(f"unknown device {name!r}; use auto, cpu or cuda")
    if name != "cpu" and not torch.cuda.is_available():
        raise BadInput(f"--device {name} needs an NVIDIA GPU that PyTorch can use, and none is visible; "
                       f"use --device cpu (or auto)")
    return torch.device(name)


def named_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules of ``model`` with these names; BadInput naming any that is not there."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise BadInput(f"protected layer(s) {', '.join(missing)} not found in the model; list module names as "
                       f"printed by `foldship inspect`")
    return [modules[name] for name in names]


def compress_model(
    model: nn.Module,
    example_inputs,
    method: str = "fold",
    ratio: float = 0.5,
    seed: int = 0,
    groups: str = "all",
    group_ratios: dict[str, float] | None = None,
    protected: Sequence[str] | None = None,
    round_to: int = 1,
    restarts: int = 4,
    repair: str = "none",
    calibration: torch.Tensor | None = None,
    device: str | torch.device = "auto",
    progress: Callable[[int], None] | None = None,
    clusters: dict[str, torch.Tensor] | None = None,
    calibration_statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    removed_blocks: Sequence[str] = (),
) -> CompressionResult:
    """Compress a copy of ``model``; the input model is left unchanged.

    ``groups="inner"`` keeps residual streams whole; ``group_ratios`` overrides the ratio per
    group (by root module name); ``protected`` names modules whose outputs stay whole (default:
    the classifier). ``clusters`` (fold) gives groups their cluster labels instead of clustering
    them, as ``CompressionResult.clusters`` records them (the budget survey re-folds a model this way).
    ``calibration_statistics`` (bn-recalibrate without reconstruct) are ``model``'s ``bn_statistics``
    on ``calibration`` by module name (``named_statistics``), measured once by a caller that
    compresses the same model many times (the budget survey) instead of again on every call.
    ``removed_blocks`` names residual blocks replaced by the identity before any group is found
    (``models.blocks``; a depth budget plan's ``removed_blocks``): the repairs measure the model without them.
    """
    if method not in METHODS:
        raise BadInput(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if groups not in GROUP_POLICIES:
        raise BadInput(f"unknown groups policy {groups!r}; choose 'all' (every group) or 'inner' (residual streams whole)")
    repair = check_repair(repair, calibration is not None)
    steps = repair_steps(repair)
    ratio = check_ratio(ratio)
    check_round_to(round_to)
    # A group ratio of 0 keeps that group whole (budgeted plans name every group they surveyed).
    ratios = {name: 0.0 if r == 0 else check_ratio(r) for name, r in (group_ratios or {}).items()}
    start = time.perf_counter()
    device = resolve_device(device)
    work = copy.deepcopy(model).eval().to(device)
    example_inputs = example_inputs.to(device) if isinstance(example_inputs, torch.Tensor) else example_inputs
    remove_blocks(work, removed_blocks, example_inputs)
    rewritten = apply_rewrites(work, example_inputs)
    protected_modules = output_layers(work, example_inputs) if protected is None else named_modules(work, protected)
    adapter = DependencyAdapter(work, example_inputs, protected_modules)
    result = CompressionResult(work, method, ratio, seed, groups, repair, rewritten_modules=rewritten,
                               removed_blocks=list(removed_blocks))
    # bn-recalibrate: the uncompressed model's statistics on the calibration images, carried through every edit
    # (with reconstruct: of each BN's input as deployed, as the reconstruction pass measures them)
    statistics = None
    if "reconstruct" in steps and "bn-recalibrate" in steps:
        statistics = bn_input_statistics(work, calibration)
    elif "bn-recalibrate" in steps:
        statistics = (bn_statistics(work, calibration) if calibration_statistics is None
                      else statistics_for(work, calibration_statistics))
    reference = copy.deepcopy(work) if "reconstruct" in steps else None  # targets come from the uncompressed model
    maps: dict[nn.Module, ChannelMap] = {}
    ledger = WidthLedger()  # every width the records state, checked against the model at the end
    with torch.no_grad():
        for view in adapter.groups():
            ledger.register(view.weighted_items)
            record = _compress_group(view, method, ratios.get(view.name, ratio), groups, seed, restarts,
                                     round_to, "fold-ar" in steps, statistics, clusters or {}, result.clusters, maps)
            ledger.narrow(view.weighted_items, record.width - record.kept)
            if record.action in ("folded", "pruned"):
                record.repair = repair_note(view, method, steps)
            result.groups.append(record)
            if progress:
                progress(1)
    ledger.check(work)
    unknown = set(ratios) - {g.name for g in result.groups}
    if unknown:
        raise BadInput(f"group ratio(s) for unknown group(s) {', '.join(sorted(unknown))}; see `foldship inspect` for group names")
    module_names = {m: n for n, m in work.named_modules()}
    result.channel_maps = {module_names[m]: channel_map for m, channel_map in maps.items()}
    if reference is not None:  # with bn-recalibrate, each BN is re-measured once the layers before it are re-solved
        result.reconstruction = reconstruct(work, reference, calibration, result.channel_maps, seed,
                                            statistics=statistics, progress=progress)
    elif statistics is not None:
        recalibrate_bn(work, calibration, reference=statistics)
    result.seconds = time.perf_counter() - start
    return result


def _compress_group(view: GroupView, method: str, ratio: float, policy: str, seed: int,
                    restarts: int, round_to: int, fold_ar: bool, statistics: Statistics | None,
                    given: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                    maps: dict[nn.Module, ChannelMap]) -> GroupRecord:
    n = view.size
    record = GroupRecord(view.name, view.kind, n, n, "kept")
    if policy == "inner" and view.kind == "stream":
        record.action = "kept: residual stream (--groups inner)"
        return record
    k = kept_width(n, ratio, round_to)
    if k >= n:
        record.action = (f"kept: not wider than round_to {round_to} (a narrower width would be padded back)"
                         if 1 < n <= round_to else "kept: width rule keeps every channel")
        return record
    reason = foldability(view)
    if reason is not None:
        record.action = f"kept: {reason}"
        return record
    rule = METHODS[method]
    blocks = fixed_blocks(view) if rule.merges else []
    if round_to > 1 and blocks:
        k, widened = multiple_with_room(n, k, blocks, round_to)
        if k >= n:
            record.action = f"kept: {widened}"
            return record
        record.width_note = widened
    features = group_features(view)
    scores = channel_scores(view, rule.norm)
    divisors = {}
    if fold_ar and rule.merges:
        # After the features: Fold-AR merges the BN-normalised rows, but of plain fold's clusters.
        divisors = normalise_producers(view)
    total = squared_norm(features)
    labels = None
    if rule.merges:
        labels = given.get(view.name)
        if labels is not None and (len(labels) != n or int(labels.max()) + 1 != k):
            raise ValueError(f"clusters given for group {view.name} do not fold {n} channels to {k}")
        if labels is None:
            labels, error = fold_labels(features, k, scores, blocks, seed, restarts)
        else:
            error = inertia(features, labels, k)
        found[view.name] = labels
        # One factor per producer->BN pair, from that producer's own rows: a depthwise group's
        # expansion conv and depthwise conv each feed their own BN.
        factors = [variance_factors(producer_rows(view, [item]), labels) for item, _ in norm_pairs(view)] if fold_ar else None
        drop = merge_clusters(view, labels)
        if factors is not None:
            scale_gammas(view, representatives(labels), factors)
    else:
        kept = top_k(scores, k)
        drop = sorted(set(range(n)) - set(kept))
        error = squared_norm(features[drop])
    record.action = rule.action
    if statistics is not None:
        carry_statistics(view, statistics, labels, drop)
    record_group_maps(view, maps, labels, representatives(labels) if labels is not None else None, drop, divisors)
    view.remove(drop)
    record.kept = k
    record.weight_error = error
    record.relative_error = error / total if total > 0 else 0.0
    return record
