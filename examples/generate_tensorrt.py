"""Greedy decoding with a mixexport TensorRT engine (the `trt` target), in Python.

    python examples/generate_tensorrt.py OUT [--tokens 16] [--prompt 1 2 3]

Needs an NVIDIA GPU, TensorRT >= 10 (`pip install -e '.[trt]'`), a CUDA build of torch (for device
buffers) and an engine built by `mixexport engine OUT --plugin ...`, which also copies the plugin
library to OUT/trt/. Profile 0 ("context") serves the prefill, profile 1 ("generation") each
decode step; `present.*` of one call is bound as `past_key_values.*` of the next.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
from pathlib import Path

import tensorrt as trt
import torch

TORCH_DTYPES = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="artifact directory with trt/model.engine")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt", type=int, nargs="+", default=[1, 15043, 29892, 920])
    args = parser.parse_args()

    manifest = json.loads((args.out / "manifest.json").read_text())
    ctypes.CDLL(str(args.out / "trt" / manifest["targets"]["trt"]["engine"]["plugin"]))  # registers MixtralMoE
    logger = trt.Logger(trt.Logger.WARNING)
    # Mapped, not read: a Python bytes copy of a Mixtral 8x7B engine would be about 90 GB more.
    with open(args.out / "trt" / "model.engine", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    if engine is None:
        raise SystemExit(f"cannot deserialize {args.out / 'trt' / 'model.engine'} (see TensorRT's message above)")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    layers = manifest["model"]["num_hidden_layers"]
    vocab = manifest["model"]["vocab_size"]
    kv_dtype = TORCH_DTYPES[engine.get_tensor_dtype("past_key_values.0.key")]
    kv_heads, head_dim = manifest["model"]["num_key_value_heads"], manifest["model"]["head_dim"]

    ids = torch.tensor([[t % vocab for t in args.prompt]], dtype=torch.int64, device="cuda")
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    past = {f"past_key_values.{i}.{kind}": torch.empty(1, kv_heads, 0, head_dim, dtype=kv_dtype, device="cuda")
            for i in range(layers) for kind in ("key", "value")}
    generated = []
    for step in range(args.tokens):
        context.set_optimization_profile_async(0 if step == 0 else 1, stream.cuda_stream)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=TORCH_DTYPES[engine.get_tensor_dtype(name)], device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise SystemExit(f"TensorRT enqueue failed at step {step}")
        stream.synchronize()
        next_token = int(outputs["logits"][0, -1].argmax())
        generated.append(next_token)
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        ids = torch.tensor([[next_token]], dtype=torch.int64, device="cuda")
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64, device="cuda")], dim=1)
    print(" ".join(map(str, generated)))


if __name__ == "__main__":
    main()
