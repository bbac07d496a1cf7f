"""The serving graph: the exported KV-cache graph rewritten so a decode step never copies the cache.

The exported graph (optimum's interface) returns ``present = Concat(past, new)`` for every layer,
and its attention reads that concatenation. onnxruntime cannot concatenate in place, so every
decode step wrote the whole cache anew: at batch 16 and 200 cached tokens the Concat nodes took
21 % of the step (onnxruntime's profiler, 2 cores). The rewrite keeps the arithmetic and drops the
copy. For each layer it

- scores the query against the past and the new keys separately and concatenates the two small
  score matrices (``[.., group * seq, past]`` and ``[.., seq]``) instead of the keys;
- splits the attention probabilities at the past length and sums ``probs_past @ past_v`` and
  ``probs_new @ new_v`` instead of multiplying by the concatenated values;
- returns only the new tokens' keys and values as ``present.N.key/value``;

and computes logits for the last position only (the scheduler samples nothing else; the LM head
over a whole prompt was a fifth of a prefill). Where the LM head's input is sliced from is the
input :data:`LOGITS_FROM`, an overridable initializer (-1 when not fed): a prefill that needs every
prompt position's logits (prompt log-probabilities for ``echo``) feeds 0; every other forward runs
as before. The caller keeps the cache itself in buffers with
spare columns (:class:`toolkit.runtime.kvcache.BatchKV` with ``spare_columns``) and writes each
step's new column in place; spare columns are masked out by the attention mask.

The rewrite matches the pattern this project's exporter writes (``toolkit.export.torch_to_onnx``:
Concat -> Transpose -> MatMul for keys, Concat -> MatMul for values). Anything else, or no ``onnx``
package (NVIDIA's image installs it, the slim serving install may not): the caller serves the graph as
exported, and says why. A graph whose weights are external data (over protobuf's 2 GiB) is rewritten
without loading them: the rewritten graph still names its data files, and onnxruntime reads them from
the original graph's folder (``session.model_external_initializers_file_folder_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.model_io.onnx_files import MAX_PROTO_BYTES, load_graph
from toolkit.repository.contract import LOGITS

_MAX_INT64 = 2**63 - 1
LOGITS_FROM = "toolkit_logits_from"  # INT64 [1]: the first position whose logits the graph returns
_PREFIX = "toolkit_split_kv"


class UnsupportedGraphError(ValueError):
    """The graph is not the pattern the rewrite knows; serve it unchanged."""


def split_kv_graph(path: Path) -> bytes:
    """The rewritten graph of the ONNX file at `path`, serialized (weights included).

    External data stays where it is (see the module doc). Raises UnsupportedGraphError (pattern not
    found, no ``onnx``, weights inline and over 2 GiB).
    """
    try:
        import onnx  # noqa: F401 - load_graph needs it
    except ImportError as err:
        raise UnsupportedGraphError("the onnx package is not installed") from err
    if path.stat().st_size > MAX_PROTO_BYTES:
        raise UnsupportedGraphError(f"{path.name} is over 2 GiB")
    model = load_graph(path)
    rewrite(model)
    data: bytes = model.SerializeToString()
    return data


def rewrite(model: Any) -> None:
    """Rewrite `model` (an onnx ModelProto) in place: split-KV attention, last-position logits."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name: o for o in graph.output}
    if LOGITS not in producer or "present.0.key" not in outputs:
        raise UnsupportedGraphError("no logits/present.0.key outputs")

    def const(suffix: str, value: int) -> str:
        name = f"{_PREFIX}_{suffix}"
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
        return name

    zero, last_axis, end, seq_axis = (const("zero", 0), const("last_axis", -1), const("end", _MAX_INT64),
                                      const("seq_axis", 1))
    removed: list[Any] = []
    added: list[Any] = []
    layer = 0
    while f"present.{layer}.key" in outputs:
        for kind in ("key", "value"):
            present, past = f"present.{layer}.{kind}", f"past_key_values.{layer}.{kind}"
            concat = producer.get(present)
            if concat is None or concat.op_type != "Concat" or list(concat.input) != [past, concat.input[-1]] \
                    or len(concat.input) != 2:
                raise UnsupportedGraphError(f"{present} is not Concat({past}, new)")
            new = concat.input[1]
            users = consumers.get(present, [])
            p = f"{_PREFIX}_{layer}_{kind}"
            if kind == "key":
                transpose = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
                matmuls = consumers.get(transpose.output[0], []) if transpose is not None else []
                if transpose is None or len(matmuls) != 1 or matmuls[0].op_type != "MatMul" \
                        or matmuls[0].input[1] != transpose.output[0]:
                    raise UnsupportedGraphError(f"{present} is not read as MatMul(query, Transpose(keys))")
                matmul = matmuls[0]
                perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"][0]
                added += [
                    helper.make_node("Transpose", [past], [f"{p}_past_t"], perm=perm),
                    helper.make_node("Transpose", [new], [f"{p}_new_t"], perm=perm),
                    helper.make_node("MatMul", [matmul.input[0], f"{p}_past_t"], [f"{p}_scores_past"]),
                    helper.make_node("MatMul", [matmul.input[0], f"{p}_new_t"], [f"{p}_scores_new"]),
                    helper.make_node("Concat", [f"{p}_scores_past", f"{p}_scores_new"], [matmul.output[0]], axis=-1),
                ]
                removed += [concat, transpose, matmul]
            else:
                if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != present:
                    raise UnsupportedGraphError(f"{present} is not read as MatMul(probs, values)")
                matmul = users[0]
                probs = matmul.input[0]
                added += [
                    helper.make_node("Shape", [past], [f"{p}_past_len"], start=2, end=3),
                    helper.make_node("Slice", [probs, zero, f"{p}_past_len", last_axis], [f"{p}_probs_past"]),
                    helper.make_node("Slice", [probs, f"{p}_past_len", end, last_axis], [f"{p}_probs_new"]),
                    helper.make_node("MatMul", [f"{p}_probs_past", past], [f"{p}_out_past"]),
                    helper.make_node("MatMul", [f"{p}_probs_new", new], [f"{p}_out_new"]),
                    helper.make_node("Add", [f"{p}_out_past", f"{p}_out_new"], [matmul.output[0]]),
                ]
                removed += [concat, matmul]
            added.append(helper.make_node("Identity", [new], [present]))
            outputs[present].type.tensor_type.shape.dim[2].dim_param = "new_tokens"
        layer += 1

    head = producer[LOGITS]
    if head.op_type not in ("MatMul", "Gemm"):
        raise UnsupportedGraphError(f"logits come from {head.op_type}, not the LM head's MatMul")
    # An input with an initializer: onnxruntime uses the initializer (-1) unless the caller feeds it.
    graph.initializer.append(helper.make_tensor(LOGITS_FROM, TensorProto.INT64, [1], [-1]))
    graph.input.append(helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1]))
    added.append(helper.make_node("Slice", [head.input[0], LOGITS_FROM, end, seq_axis], [f"{_PREFIX}_last_hidden"]))
    head.input[0] = f"{_PREFIX}_last_hidden"
    outputs[LOGITS].type.tensor_type.shape.dim[1].dim_param = "last_position"

    gone = {id(node) for node in removed}
    nodes = [node for node in graph.node if id(node) not in gone] + added
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    if model.ir_version < 4:  # inputs with a default (an initializer of the same name) need IR 4
        model.ir_version = 4
    del graph.value_info[:]  # shapes inferred for the old nodes no longer hold


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    ready = set(available) | {""}
    ordered: list[Any] = []
    pending = nodes
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            node = waiting[0]
            raise UnsupportedGraphError(f"the rewritten graph has unresolved inputs ({node.op_type} {node.name})")
        pending = waiting
    return ordered
