"""GPTQ rounding (:func:`toolkit.export.int8_methods.gptq_int8`) on plain matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import StageError
from toolkit.export.int8_methods import gptq_int8, quantize_int8


def _problem(seed: int, k: int = 48, n: int = 16, samples: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)  # correlated input channels, as in a real layer
    x = rng.normal(size=(samples, k)) @ mix
    w = rng.normal(size=(k, n)).astype(np.float32)
    return x, w, np.abs(w).max(axis=0) / 127.0


def test_uncorrelated_inputs_give_round_to_nearest() -> None:
    _x, w, scale = _problem(0)
    q = gptq_int8(w, np.eye(w.shape[0]), scale.astype(np.float64))
    assert np.array_equal(q, np.clip(np.rint(w / scale), -127, 127).astype(np.int8))


def test_correlated_inputs_get_a_smaller_output_error_than_round_to_nearest() -> None:
    for seed in range(3):
        x, w, scale = _problem(seed)
        hessian = x.T @ x / len(x)
        q = gptq_int8(w, hessian, scale.astype(np.float64), block=16)  # several blocks: the cross-block update runs
        rtn = np.clip(np.rint(w / scale), -127, 127)
        assert q.dtype == np.int8 and np.abs(q).max() <= 127
        err = np.mean((x @ (q * scale) - x @ w) ** 2)
        err_rtn = np.mean((x @ (rtn * scale) - x @ w) ** 2)
        assert err < 0.8 * err_rtn, (seed, err, err_rtn)


def test_weights_sharing_an_input_round_the_same_side_by_side_as_alone() -> None:
    """Why the Q/DQ graph runs GPTQ once per shared input (q, k, v; gate, up): the columns are independent."""
    x, w, scale = _problem(4, k=48, n=24)
    hessian = x.T @ x / len(x)
    alone = [gptq_int8(w[:, a:b], hessian, scale[a:b].astype(np.float64), block=16) for a, b in ((0, 16), (16, 24))]
    together = gptq_int8(w, hessian, scale.astype(np.float64), block=16)
    assert np.array_equal(together, np.concatenate(alone, axis=1))


def test_a_dead_input_channel_is_tolerated() -> None:
    x, w, scale = _problem(1)
    x[:, 3] = 0.0  # never active: its Hessian row is zero
    q = gptq_int8(w, x.T @ x / len(x), scale.astype(np.float64))
    assert q.shape == w.shape and not np.any(q[3])


def test_per_weight_scales_and_a_signed_int8_range_are_honoured() -> None:
    """onnxruntime's MatMulNBits blocks: a signed scale per (block of rows, column), integers -128..127."""
    x, w, _ = _problem(2, k=64)
    block = 16
    blocks = w.reshape(64 // block, block, -1)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
    scale = np.repeat(signed_max / -128.0, block, axis=0).astype(np.float64)  # [K, N]
    q = gptq_int8(w, x.T @ x / len(x), scale, qmin=-128, qmax=127)
    assert q.min() >= -128 and q.max() <= 127
    rtn = np.clip(np.rint(w / scale), -128, 127)
    err = np.mean((x @ (q * scale) - x @ w) ** 2)
    assert err < 0.8 * np.mean((x @ (rtn * scale) - x @ w) ** 2)


def test_gptq_without_calibration_is_a_clear_error(tmp_path: Path) -> None:
    """A dataset with no training conversations and no control examples: the stage says why, before any work."""
    for method in ("weight_only_gptq_qdq", "int8_weight_only_gptq"):
        with pytest.raises(StageError, match="GPTQ needs calibration samples"):
            quantize_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", method, [])
    assert not (tmp_path / "out.onnx").exists()
