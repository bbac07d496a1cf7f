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


def load_graph(onnx_path: Path, inline_below_bytes: int = 1 << 20) -> Any:
    """The ModelProto at `onnx_path` with its large external tensors left on disk.

    External tensors smaller than `inline_below_bytes` (shape constants, axes, norms) are read in:
    onnxruntime, given a graph from memory, resolves large weights from the folder
    (``session.model_external_initializers_file_folder_path``) but needs the constants its shape
    inference reads ("Cannot parse data from external tensors"). They are read here rather than by
    onnx's helper, which refuses a data file with several hard links, as every repository version's is.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    folder = onnx_path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        length = int(info.get("length", inline_below_bytes))
        if length >= inline_below_bytes:
            continue
        source = (folder / info["location"]).resolve()
        if source.parent != folder:
            raise ValueError(f"{onnx_path}: tensor {tensor.name} names data outside its folder: {info['location']}")
        with source.open("rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            tensor.raw_data = fh.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return model


def load_onnx(onnx_path: Path) -> Any:
    """The whole ModelProto at `onnx_path`, external weights included (see :func:`load_graph` for why not onnx.load)."""
    return load_graph(onnx_path, inline_below_bytes=1 << 62)


def onnx_files(onnx_path: Path) -> list[Path]:
    """The graph file and every external data file beside it that it needs, graph first."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [onnx_path, *(onnx_path.parent / name for name in external_data_names(model))]


def onnx_bytes(onnx_path: Path) -> int:
    """Bytes on disk of the graph and its external data."""
    return sum(path.stat().st_size for path in onnx_files(onnx_path))


def inline_bytes(model: Any) -> int:
    """Bytes of tensor data an onnx ModelProto holds in itself (what a save without external data writes)."""
    return sum(len(tensor.raw_data) + 4 * len(tensor.float_data) + 8 * len(tensor.int64_data)
               + 4 * len(tensor.int32_data) for tensor in _tensors(model.graph))


def needs_external_data(model: Any) -> bool:
    """Whether `model` is too big to save as one protobuf message (with room for the graph itself)."""
    return inline_bytes(model) > MAX_PROTO_BYTES - (64 << 20)


def save_onnx(model: Any, path: Path) -> Path:
    """Save `model`, its tensors in ``<name>.data`` beside it when it is too big for one message."""
    import onnx

    if needs_external_data(model):
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # save_model appends to an existing file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path
