"""materialize: one copy that converts and re-lays an expert slice, on irregular shapes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from mixexport.capture.lazy_weights import StackedLazyTensor, materialize
from mixexport.targets.ort.lowering import interleave_gate_up


@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("target", [ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16])
def test_convert_and_interleave_in_one_copy(stored, target):
    w = np.random.default_rng(0).standard_normal((1, 2 * 5, 7)).astype(stored)
    got = materialize(interleave_gate_up(w)[0], target, (2 * 5, 7))
    want = interleave_gate_up(w.astype(target.numpy())).reshape(1, 2 * 5, 7)[0]
    assert got.dtype == target.numpy() and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_transpose_converts_while_it_copies():
    w = np.arange(12, dtype=ml_dtypes.bfloat16).reshape(3, 4)
    got = materialize(w.T, ir.DataType.FLOAT16, (4, 3))
    np.testing.assert_array_equal(got, w.T.astype(np.float16))


def test_same_dtype_and_layout_is_not_copied():
    w = np.ones((4, 3), np.float16)
    assert materialize(w, ir.DataType.FLOAT16, (12,)).base is w


def test_stacked_tensor_slices_are_in_its_dtype():
    raw = np.random.default_rng(1).standard_normal((3, 4, 6)).astype(ml_dtypes.bfloat16)
    tensor = StackedLazyTensor(lambda e: raw[e], 3, ir.DataType.FLOAT16, ir.Shape(raw.shape))
    np.testing.assert_array_equal(tensor.numpy(), raw.astype(np.float16))
    assert tensor.slice(2).dtype == np.float16
