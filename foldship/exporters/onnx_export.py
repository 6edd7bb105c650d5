"""ONNX export with a dynamic batch axis, checked by ``onnx.checker`` before it is kept."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import BadInput
from ..files import sha256_of
from .verify import node_counts

EXPORTERS = ("dynamo", "legacy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Protobuf cannot hold more than 2 GiB: above this, weights go to one ``<file>.data`` beside the graph.
SINGLE_FILE_LIMIT = 2**31 - 2**26


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
    """Export ``model`` to ``path`` (named I/O, dynamic batch), verified by onnx.checker.

    One file, unless the weights pass 2 GiB (then one ``<name>.data`` file beside it).

    The file is written under a temporary name and renamed only once it passes the checker.
    """
    if exporter not in EXPORTERS:
        raise BadInput(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.eval().cpu()
    example = example.cpu()
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if weight_bytes > SINGLE_FILE_LIMIT and exporter == "legacy":
        raise BadInput("models over 2 GB need the dynamo exporter (one external .data file); drop --exporter legacy")
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dims = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                proto = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                          output_names=[OUTPUT_NAME], dynamic_shapes=dims, opset_version=opset,
                                          optimize=True, verbose=False).model_proto
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset or 17)
                proto = onnx.load(str(tmp))
        strip_provenance(proto)
        save_onnx(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        remove_onnx(tmp)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"ONNX export ({exporter}) failed: {first}; try --exporter "
                       f"{'legacy' if exporter == 'dynamo' else 'dynamo'}") from exc
    move_onnx(tmp, path)
    return describe_onnx(path, exporter)


def describe_onnx(path: str | Path, exporter: str) -> OnnxArtifact:
    """The artifact record of an ONNX file on disk (opset, hash, size, operators)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxArtifact(str(path), exporter, opset, sha256_of(path), path.stat().st_size, node_counts(proto))


def strip_provenance(proto: onnx.ModelProto) -> None:
    """Drop per-node metadata and doc strings: the dynamo exporter stores Python stack traces there,
    with the absolute paths of this checkout, so the same model would give different bytes elsewhere."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.graph.doc_string = ""


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> None:
    """Save as one file, or with all weights in one ``<name>.data`` file beside it above 2 GiB."""
    path = Path(path)
    if sum(len(t.raw_data) for t in proto.graph.initializer) <= SINGLE_FILE_LIMIT:
        onnx.save(proto, str(path))
        return
    detached = onnx.ModelProto()
    detached.CopyFrom(proto)  # saving to external data strips the tensors of the proto it is given
    onnx.save(detached, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data")


def move_onnx(src: str | Path, dst: str | Path) -> None:
    """Rename a graph (and its external data file, if any) into place.

    The graph records its data file by name, so a graph with external data is re-saved instead.
    """
    src, dst = Path(src), Path(dst)
    if Path(f"{src}.data").exists():
        save_onnx(onnx.load(str(src)), dst)
        remove_onnx(src)
    else:
        os.replace(src, dst)


def remove_onnx(path: str | Path) -> None:
    for p in (Path(path), Path(f"{path}.data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
