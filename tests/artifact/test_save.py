"""save_model: the weights file is dense, in graph order, hashed as written, and bounded in memory."""

from __future__ import annotations

import threading

import numpy as np
import onnx_ir as ir
import pytest

import mixexport.artifact.save as save
from mixexport.artifact.manifest import sha256_file
from mixexport.capture.lazy_weights import StackedLazyTensor
from mixexport.errors import InternalError

E, ROWS, COLS = 5, 7, 9  # an irregular expert stack, over INLINE_BYTES in fp16 too


class Counting:
    """Parts that record how many expert slices exist at once (made but not yet written)."""

    def __init__(self, stack: np.ndarray):
        self.stack, self.live, self.peak = stack, 0, 0
        self.lock = threading.Lock()

    def part(self, e: int) -> np.ndarray:
        with self.lock:
            self.live += 1
            self.peak = max(self.peak, self.live)
        return self.stack[e].copy()

    def written(self) -> None:
        with self.lock:
            self.live -= 1


def model_with(initializers: dict[str, ir.TensorProtocol]) -> ir.Model:
    graph = ir.Graph([], [], nodes=[], name="g")
    for name, tensor in initializers.items():
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        graph.outputs.append(value)
    return ir.Model(graph, ir_version=10)


def saved_arrays(folder) -> dict[str, np.ndarray]:
    model = ir.load(folder / save.ONNX_FILE)
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weights_round_trip_in_graph_order(tmp_path, dtype):
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((E, ROWS, COLS)).astype(dtype)
    plain = rng.standard_normal((11, 13)).astype(dtype)
    tiny = np.arange(3, dtype=np.int64)  # 24 bytes: stays inside the ONNX file
    stacked = StackedLazyTensor(lambda e: stack[e], E, ir.DataType.from_numpy(np.dtype(dtype)), ir.Shape(stack.shape))
    model = model_with({"b.plain": ir.tensor(plain), "a.stack": stacked, "c.tiny": ir.tensor(tiny)})
    entries = save.save_model(model, tmp_path, tmp_path, "test")

    arrays = saved_arrays(tmp_path)
    np.testing.assert_array_equal(arrays["a.stack"], stack)
    np.testing.assert_array_equal(arrays["b.plain"], plain)
    np.testing.assert_array_equal(arrays["c.tiny"], tiny)
    # Dense and in graph order: plain first, then the stack; the small tensor is not in the file.
    data = (tmp_path / save.DATA_FILE).read_bytes()
    assert data == plain.tobytes() + stack.tobytes()
    assert [e["path"] for e in entries] == [save.ONNX_FILE, save.DATA_FILE]
    for entry in entries:
        assert entry["sha256"] == sha256_file(tmp_path / entry["path"])
        assert entry["bytes"] == (tmp_path / entry["path"]).stat().st_size


def test_in_flight_slices_stay_bounded(tmp_path, monkeypatch):
    """With room for two slices ahead of the writer, no more than that (+ the one being hashed) exist."""
    stack = np.ones((16, 64, 64), np.float32)  # 16 KiB slices
    counting = Counting(stack)
    tensor = StackedLazyTensor(counting.part, 16, ir.DataType.FLOAT, ir.Shape(stack.shape))
    monkeypatch.setattr(save, "MAX_IN_FLIGHT", 2 * stack[0].nbytes)
    real_as_bytes = save._as_bytes

    def as_bytes(data):  # a slice leaves memory once the writer took it
        counting.written()
        return real_as_bytes(data)

    monkeypatch.setattr(save, "_as_bytes", as_bytes)
    save.save_model(model_with({"w": tensor}), tmp_path, tmp_path, "test")
    assert 1 <= counting.peak <= 2
    np.testing.assert_array_equal(saved_arrays(tmp_path)["w"], stack)


def test_a_slice_of_the_wrong_size_is_an_internal_error(tmp_path):
    wrong = StackedLazyTensor(lambda e: np.zeros((ROWS - 1, COLS), np.float32), E, ir.DataType.FLOAT,
                              ir.Shape((E, ROWS, COLS)))
    with pytest.raises(InternalError, match=r"54 elements of shape \(6, 9\) cannot be laid out as \(7, 9\)"):
        save.save_model(model_with({"w": wrong}), tmp_path, tmp_path, "test")


def test_progress_reports_bytes_written(tmp_path, monkeypatch):
    monkeypatch.setattr(save, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    stack = np.zeros((E, ROWS, COLS), np.float32)
    tensor = StackedLazyTensor(lambda e: stack[e], E, ir.DataType.FLOAT, ir.Shape(stack.shape))
    save.save_model(model_with({"w": tensor}), tmp_path, tmp_path, "ort", lines.append)
    assert len(lines) == E
    assert lines[-1].startswith("ort: 0.0 of 0.0 GB written (")
