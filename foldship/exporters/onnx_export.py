"""ONNX export with a dynamic batch axis, checked by ``onnx.checker`` before it is kept."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import BadInput
from ..models.registry import sha256_of

EXPORTERS = ("dynamo", "legacy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class OnnxArtifact:
    path: str
    exporter: str
    opset: int
    sha256: str
    size_bytes: int
    node_counts: dict[str, int] = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return sum(self.node_counts.values())


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, exporter: str = "dynamo",
                opset: int | None = None, dynamic_batch: bool = True) -> OnnxArtifact:
    """Export ``model`` to ``path`` (single file, named I/O, dynamic batch), verified by onnx.checker.

    The file is written under a temporary name and renamed only once it passes the checker.
    """
    if exporter not in EXPORTERS:
        raise BadInput(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.eval().cpu()
    example = example.cpu()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dims = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dims,
                                  opset_version=opset, optimize=True, verbose=False)
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset or 17)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        _remove(tmp)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"ONNX export ({exporter}) failed: {first}; try --exporter "
                       f"{'legacy' if exporter == 'dynamo' else 'dynamo'}") from exc
    os.replace(tmp, path)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxArtifact(str(path), exporter, opset_used, sha256_of(path), path.stat().st_size,
                        dict(sorted(Counter(n.op_type for n in proto.graph.node).items())))


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}.data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
