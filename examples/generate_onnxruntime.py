"""Greedy decoding with a mixexport artifact in plain onnxruntime (the `ort` or `portable` target).

    python examples/generate_onnxruntime.py OUT [--target ort] [--tokens 16] [--prompt 1 2 3]

It reads the bindings from OUT/manifest.json, runs a prefill, then feeds `present.*` back as
`past_key_values.*` one token at a time: the loop a production runtime implements.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="artifact directory written by `mixexport build`")
    parser.add_argument("--target", default="ort", choices=["ort", "portable"])
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--prompt", type=int, nargs="+", default=[1, 15043, 29892, 920], help="prompt token ids")
    args = parser.parse_args()

    manifest = json.loads((args.out / "manifest.json").read_text())
    target = manifest["targets"][args.target]
    session = ort.InferenceSession(str(args.out / target["onnx"]), providers=["CPUExecutionProvider"])
    vocab = manifest["model"]["vocab_size"]
    past_dtype = np.float16 if target["dtype"] == "float16" else np.float32
    past_inputs = [b for b in target["inputs"] if b["name"].startswith("past_key_values.")]

    ids = np.array([[t % vocab for t in args.prompt]], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    feed_past = {b["name"]: np.zeros((1, b["shape"][1], 0, b["shape"][3]), past_dtype) for b in past_inputs}
    generated = []
    for _ in range(args.tokens):
        outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **feed_past})
        named = dict(zip((o.name for o in session.get_outputs()), outputs))
        next_token = int(named["logits"][0, -1].argmax())
        generated.append(next_token)
        feed_past = {b["name"]: named[b["name"].replace("past_key_values.", "present.")] for b in past_inputs}
        ids = np.array([[next_token]], dtype=np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    print(" ".join(map(str, generated)))


if __name__ == "__main__":
    main()
