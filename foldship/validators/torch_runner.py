"""A Polygraphy runner for PyTorch modules: PyTorch artifacts go through the same inference path
(``run_outputs``) as ONNX files and engines."""
from __future__ import annotations

import copy
import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from torch import nn

from .threads import resolved_threads


class TorchRunner(BaseRunner):
    """A Polygraphy runner for an ``nn.Module`` on CPU or CUDA.

    Polygraphy's own ``PytRunner`` always moves inputs to CUDA and iterates the output as a tuple,
    so a CPU model, or one returning a single logits tensor, does not fit it.
    """

    def __init__(self, module: nn.Module, device: str, input_shape: tuple[int, ...], name: str, threads: int = 0):
        super().__init__(name=name, prefix="torch-runner")
        self._module, self.device, self.input_shape, self.threads = module, device, tuple(input_shape), threads

    def activate_impl(self):
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(resolved_threads(self.threads))
        # A module elsewhere is copied over: the caller's module stays where it is.
        on_device = next(self._module.parameters()).device.type == torch.device(self.device).type
        self.module = (self._module if on_device else copy.deepcopy(self._module).to(self.device)).eval()
        self.dtype = next(self.module.parameters()).dtype

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        return TensorMetadata().add("input", dtype=np.float32, shape=(-1, *self.input_shape))

    def infer_impl(self, feed_dict):
        x = torch.from_numpy(np.ascontiguousarray(next(iter(feed_dict.values()))))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.module(x.to(self.device, self.dtype)).float().cpu().numpy()
        self.inference_time = time.perf_counter() - start  # Comparator.run sums it
        return OrderedDict(logits=logits)

    def deactivate_impl(self):
        torch.set_num_threads(self.previous_threads)
        del self.module
