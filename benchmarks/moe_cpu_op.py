"""One MoE layer on onnxruntime's CPU provider: the CPU MoE op library (plugins/ort_moe) against the
ort target's other two forms of the same layer, side by side in one process.

    python benchmarks/moe_cpu_op.py --library LIB [--shape mid|wide] [--tokens 1 4 32 512] [--rounds 5]

Rows, each checked against `mixexport.model.moe.moe_reference` on the timed input before it is timed:
- op library:        one `mixexport.ort.MoE` node (`LowerMoEToOrt(library=True)`, what `build
                     --ort-moe-library` writes), LIB loaded;
- ort CPU form:      the standard-ONNX form the ort target lowers to for the CPU provider (one If
                     per expert, pre-transposed weights; `LowerMoEToOrt(provider="cpu")`);
- com.microsoft.MoE: onnxruntime's fused op (`LowerMoEToOrt(provider="cuda")`), run on CPU.

Shapes: mid (H 512, I 1792, E 8, top-2: the decode benchmark's mid model) and wide (H 2048,
I 7168, E 8, top-2: a quarter of Mixtral-8x7B's layer in each dimension, 1.4 GB of float32
experts). Every session has intra_op_num_threads 2. Each token count is timed in --rounds rounds
with the rows interleaved; a row's number is the median over rounds of its per-round median
(--repeats runs each, each after a 96 MB buffer is written: the layer's weights come from DRAM, as
in a decode step, where the other layers' weights have evicted them). "GB/s" is the bytes of the experts the batch routes to over the time: at
small token counts a MoE layer is bandwidth bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from passes.single_moe import moe_weights, single_moe_model  # noqa: E402

from mixexport.model.moe import moe_reference  # noqa: E402
from mixexport.targets.ort import moe_library  # noqa: E402
from mixexport.targets.ort.lowering import LowerMoEToOrt  # noqa: E402

SHAPES = {"mid": (512, 1792, 8, 2), "wide": (2048, 7168, 8, 2)}
THREADS = 2


def session(model: ir.Model, library: Path | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    if library is not None:
        moe_library.register(options, library)
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, required=True, help="libmixexport_ort_moe.so (plugins/ort_moe)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 32, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20, help="runs per row per round (fewer for many tokens)")
    args = ap.parse_args()
    moe_library.check_library(args.library)
    h, i, e, k = SHAPES[args.shape]
    w_gate_up, w_down = moe_weights(e, h, i)
    print(f"one MoE layer: H {h}, I {i}, E {e}, top-{k}, float32 ({w_gate_up.nbytes * 1.5 / 1e9:.2f} GB of experts); "
          f"onnxruntime {ort.__version__}, {THREADS} threads", flush=True)

    def model(lowering):
        m = single_moe_model(w_gate_up, w_down, top_k=k, normalize=True)
        lowering(m)
        return m

    rows = {"op library": session(model(LowerMoEToOrt(provider="cpu", library=True)), args.library),
            "ort CPU form": session(model(LowerMoEToOrt(provider="cpu")), None),
            "com.microsoft.MoE": session(model(LowerMoEToOrt(provider="cuda")), None)}
    expert_bytes = w_gate_up[0].nbytes + w_down[0].nbytes
    rng = np.random.default_rng(0)
    evict = np.zeros(96 * 1024**2 // 4, np.float32)  # 96 MB: more than the largest L3 of these machines
    print(f"\n{'tokens':>6} {'row':<20} {'ms':>9} {'GB/s':>7} {'x op':>6} {'max |err|':>10}")
    for n in args.tokens:
        x = rng.standard_normal((n, h), dtype=np.float32)
        logits = rng.standard_normal((n, e), dtype=np.float32)
        want = moe_reference(torch.from_numpy(x), torch.from_numpy(logits), torch.from_numpy(w_gate_up),
                             torch.from_numpy(w_down), k, True).numpy()
        chosen = len(set(np.argsort(-logits, axis=1, kind="stable")[:, :k].ravel().tolist()))
        errors = {}
        for label, sess in rows.items():
            (y,) = sess.run(None, {"x": x, "logits": logits})
            errors[label] = float(np.abs(y - want).max())
            if not errors[label] < 1e-3 * max(1.0, float(np.abs(want).max())):
                raise SystemExit(f"{label}: does not match the reference at {n} tokens (max |err| {errors[label]:.2e})")
        repeats = max(3, args.repeats if n <= 32 else args.repeats // 4)
        times: dict[str, list[float]] = {label: [] for label in rows}
        for _ in range(args.rounds):
            for label, sess in rows.items():
                sess.run(None, {"x": x, "logits": logits})  # warm
                runs = []
                for _ in range(repeats):
                    evict[:] += 1  # the layer's weights leave the caches, as between a decode step's layers
                    t = time.perf_counter()
                    sess.run(None, {"x": x, "logits": logits})
                    runs.append(time.perf_counter() - t)
                times[label].append(statistics.median(runs))
        op = statistics.median(times["op library"])
        for label in rows:
            ms = statistics.median(times[label]) * 1e3
            print(f"{n:>6} {label:<20} {ms:>9.3f} {chosen * expert_bytes / (ms / 1e3) / 1e9:>7.1f} "
                  f"{ms / (op * 1e3):>6.2f} {errors[label]:>10.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
