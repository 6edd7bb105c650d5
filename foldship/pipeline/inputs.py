"""The compressed engine's input, when it is smaller than the baseline's (``compressed_input_size``).

A smaller input is compression too: a convolutional network's MACs fall with the pixels it sees,
and an image model with global pooling runs at any size. The baseline keeps its own input and
preprocessing; the compressed side sees the same pictures, the same part of each, at ``side``
pixels (``data.presets.scaled_to``). Everything that feeds the compressed model (calibration, the
budget survey, distillation, export, its evaluation) uses this input; MAC and latency goals stay
fractions of the baseline at its own input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..data import ImageSet, load_images
from ..data.presets import scaled_to
from ..errors import BadInput
from ..models.spec import LoadedModel, Preprocessing, check_forward

# Each side's input: its shape without the batch axis (None: the images' own) and its preprocessing.
SideInput = tuple[tuple[int, ...] | None, Preprocessing]


def check_input_size(size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise BadInput(f"compressed_input_size must be a whole number of pixels >= 1, got {size!r}")


def compressed_side(loaded: LoadedModel, size: int | None) -> LoadedModel:
    """``loaded`` as the compressed model will be fed: the same module at a ``size`` x ``size`` input
    with its preprocessing scaled to it; ``loaded`` itself without a size."""
    if size is None:
        return loaded
    shape = tuple(loaded.input_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise BadInput(f"compressed_input_size shrinks square images; model {loaded.name} takes inputs of shape "
                       f"{shape}; leave compressed_input_size out")
    if size >= shape[1]:
        raise BadInput(f"compressed_input_size {size} is not smaller than the model's {shape[1]} px input; choose a "
                       f"smaller size or leave it out")
    shrunk = dataclasses.replace(loaded, input_shape=(shape[0], size, size),
                                 preprocessing=scaled_to(loaded.preprocessing, shape[1], size))
    try:
        check_forward(shrunk)
    except BadInput as exc:
        raise BadInput(f"compressed_input_size {size}: {exc}".split("; set input_size")[0] +
                       "; choose a larger compressed_input_size") from None
    return shrunk


def load_side_images(path: str, inputs: dict[str, SideInput], limit: int | None, num_classes: int | None,
                     progress: Callable[[int], None] | None = None) -> dict[str, ImageSet]:
    """The labelled images ``path`` holds, prepared for each side: read once per distinct preprocessing (both sides
    share one set unless the compressed engine takes a smaller input), each checked against its side's shape."""
    images: dict[str, ImageSet] = {}
    for side, (shape, preprocessing) in inputs.items():
        same = next((s for s in images if inputs[s][1] == preprocessing), None)
        images[side] = images[same] if same else load_images(path, preprocessing, limit, num_classes,
                                                              input_shape=shape, progress=progress)
    return images


def input_entry(shape: tuple[int, ...], preprocessing: Preprocessing) -> dict:
    """A side's ``input`` entry of report.json (``report.side_inputs`` reads it back)."""
    return {"shape": list(shape), "preprocessing": dataclasses.asdict(preprocessing)}
