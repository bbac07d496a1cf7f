"""An ONNX model on disk is its graph file plus, past protobuf's 2 GiB, the files that hold its tensors.

``torch.onnx`` writes a graph over 2 GiB as ``model.onnx`` plus ``model.onnx.data``; each tensor names its
file (``location``) relative to the graph's folder. Whatever moves, links or rewrites a graph must take
those files along, or the copy fails to load ("External data path does not exist").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# protobuf's hard limit on one serialized message: a graph with its weights inline cannot be larger
MAX_PROTO_BYTES = 2**31 - 1


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def external_data_names(model: Any) -> list[str]:
    """The external data files (relative to the graph's folder) an onnx ModelProto refers to."""
    from onnx import TensorProto

    names = {
        entry.value
        for tensor in _tensors(model.graph)
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(names)


def onnx_files(onnx_path: Path) -> list[Path]:
    """The graph file and every external data file beside it that it needs, graph first."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [onnx_path, *(onnx_path.parent / name for name in external_data_names(model))]


def onnx_bytes(onnx_path: Path) -> int:
    """Bytes on disk of the graph and its external data."""
    return sum(path.stat().st_size for path in onnx_files(onnx_path))
