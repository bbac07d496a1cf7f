"""The split-KV rewrite refuses graphs it does not know, so the runner serves them as exported."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.runtime.decode_graph import UnsupportedGraphError, split_kv_graph
from toolkit.runtime.runners import OnnxRunner


def _identity_lm(path: Path) -> Path:
    """A graph with the exported interface whose present is not Concat(past, new)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 1, "p", 2]),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["b", 1, "p", 2])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["b", 1, "p", 2]),
               helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["b", 1, "p", 2])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axis"], ["ids_3d"]),
             helper.make_node("MatMul", ["ids_3d", "head"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    init = [helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
            helper.make_tensor("head", TensorProto.FLOAT, [1, 4], [1, 2, 3, 4])]
    model = helper.make_model(helper.make_graph(nodes, "identity", inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_an_unknown_graph_is_refused_and_served_as_exported(tmp_path: Path) -> None:
    path = _identity_lm(tmp_path / "model.onnx")
    with pytest.raises(UnsupportedGraphError, match="present.0.key is not Concat"):
        split_kv_graph(path)
    runner = OnnxRunner(path, threads=1)
    assert runner.kv_spare_columns == 0
    assert runner.graph_note.startswith("the exported graph (no split-KV rewrite: present.0.key is not Concat")
