"""Checkpoints saved under other names: an explicit, verified mapping onto the model's names.

Three mappings, named in the report: ``names`` (the checkpoint already uses the model's names),
``by-order`` (the i-th tensor is the model's i-th tensor; refused unless counts and every shape
agree one to one) and a rename table (full-match regular expression -> replacement, applied to
each checkpoint name; a name no pattern matches is kept). Whatever the mapping, the result is
then loaded strictly, so nothing is silently left at its initial value.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import BadInput

BY_NAME, BY_ORDER, RENAME = "names", "by-order", "rename"


def _counted(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    # BatchNorm's step counter is bookkeeping that some trainers never save: never part of a mapping.
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_by_order(state: dict[str, torch.Tensor], model: nn.Module, source) -> dict[str, torch.Tensor]:
    """Give the i-th checkpoint tensor the model's i-th name, or refuse at the first disagreement."""
    theirs, ours = _counted(state), _counted(model.state_dict())
    if len(theirs) != len(ours):
        raise BadInput(f"checkpoint {source} holds {len(theirs)} tensors but the model has {len(ours)}; "
                       f"checkpoint_map: by-order needs the same tensors in the same order (use a rename table)")
    for i, ((name, tensor), (own_name, own)) in enumerate(zip(theirs, ours)):
        if tensor.shape != own.shape:
            raise BadInput(f"checkpoint {source}: tensor #{i} {name} {tuple(tensor.shape)} does not match model "
                           f"tensor {own_name} {tuple(own.shape)}; checkpoint_map: by-order needs every shape to "
                           f"agree in order (wrong model or width?)")
    return {own_name: tensor for (_, tensor), (own_name, _) in zip(theirs, ours)}


def map_by_table(state: dict[str, torch.Tensor], table: dict[str, str], source) -> dict[str, torch.Tensor]:
    """Rename each checkpoint tensor by the first pattern that matches its whole name."""
    try:
        patterns = [(re.compile(pattern), replacement) for pattern, replacement in table.items()]
    except re.error as exc:
        raise BadInput(f"checkpoint_map has an invalid pattern ({exc}); keys are regular expressions "
                       f"matched against whole checkpoint names") from None
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in state.items():
        new = next((p.sub(r, name) for p, r in patterns if p.fullmatch(name)), name)
        if new in origin:
            raise BadInput(f"checkpoint_map renames both {origin[new]} and {name} of {source} to {new}; "
                           f"make the patterns one to one")
        renamed[new], origin[new] = tensor, name
    return renamed


def apply_mapping(state: dict[str, torch.Tensor], model: nn.Module, mapping, source) -> tuple[dict, str]:
    """The state dict under the model's names, and the name of the mapping used (for the report)."""
    if mapping in (None, BY_NAME):
        return state, BY_NAME
    if mapping == BY_ORDER:
        return map_by_order(state, model, source), BY_ORDER
    if isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        return map_by_table(state, mapping, source), RENAME
    raise BadInput(f"checkpoint_map must be 'names', 'by-order' or a table of pattern: replacement strings, "
                   f"got {mapping!r}")
