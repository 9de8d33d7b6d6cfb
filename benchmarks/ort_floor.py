"""Where the default `ort` graph's decode step goes on CPU: the graph, the same graph without its MoE
routing, and its matrix products alone, side by side with llama.cpp.

    python benchmarks/ort_floor.py [--rounds N] [--steps N] [--llama-cpp DIR] [--workdir DIR]

On the `mid` config of `decode_speed.py` (hidden 512, 8 layers, 8 experts, top-2, vocab 32000,
fp32) it builds the default `ort` target (`mixexport build --target ort --no-validate`) and times,
at batch 1, rows interleaved round after round, each row's best median over the rounds:

- ours ort:        the default artifact, through `mixexport generate`'s plain loop (as decode_speed.py)
- no routing:      the same graph with each layer's routing and `If`s replaced by its experts 0..k-1
                   run unconditionally (the same bytes a step reads; the tokens are not the model's)
- matmuls alone:   a graph of nothing but the step's matrix products on the artifact's own weights
                   (read in place from its model.onnx.data), in graph order, at one row: q/k/v, o,
                   router, experts 0..k-1 of each layer, lm_head
- ours ort op:     (--ort-moe-library LIB) the ort graph built with the CPU MoE op library of
                   plugins/ort_moe, its session loading LIB (native code: not the default graph)
- llama.cpp f32:   (--llama-cpp) llama.cpp over a GGUF its converter makes of the same checkpoint

"matmuls alone" is what onnxruntime's MatMul kernel (MLAS) takes to stream the weights: the floor
of any graph built from standard onnxruntime kernels. What the graph spends above it is the rest of
the step's ~600 kernels, each of which finds the caches emptied by the weights streamed before it.
The ablations are timing instruments, not artifacts: nothing here checks their outputs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

import decode_speed as ds

LABELS = ("ours ort", "no routing", "matmuls alone", "ours ort op", "llama.cpp f32")


def _moe_layers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each layer's lowered MoE nodes (named `layers.{i}.moe.ort/...`), in graph order."""
    layers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if ".moe.ort/" in node.name:
            layers.setdefault(node.name.split(".moe.ort/")[0], []).append(node)
    if not layers:
        raise SystemExit("the artifact's ort graph has no sparse MoE (built with another lowering?)")
    return layers


def _branch_weights(if_node: onnx.NodeProto) -> tuple[str, str, str]:
    """(x, gate/up weight, down weight) of an expert's `then` branch: x is the outer value its token
    Gather reads, the weights the initializers its two MatMuls read."""
    branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    made = {out for node in branch.node for out in node.output}
    x = next(n.input[0] for n in branch.node if n.op_type == "Gather" and n.input[0] not in made and n.input[1] in made)
    gate_up, down = (n.input[1] for n in branch.node if n.op_type == "MatMul")
    return x, gate_up, down


def _top_k(nodes: list[onnx.NodeProto], inits: dict) -> int:
    """The k of a layer's routing TopK (a constant initializer in the built graph)."""
    top = next(n for n in nodes if n.op_type == "TopK")
    return int(numpy_helper.to_array(inits[top.input[1]]).reshape(-1)[0])


def write_ablations(model_path: Path) -> tuple[Path, Path]:
    """Beside model.onnx: no_routing.onnx and matmuls.onnx, both reading model.onnx.data in place."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    layers = _moe_layers(graph)

    # no routing: each layer's routing + Ifs + Sum -> its experts 0..k-1 on every token, summed
    dropped = {id(n) for nodes in layers.values() for n in nodes}
    firsts = {id(nodes[0]): prefix for prefix, nodes in layers.items()}
    kept = []
    for node in graph.node:
        prefix = firsts.get(id(node))
        if prefix is not None:
            nodes = layers[prefix]
            ifs = [n for n in nodes if n.op_type == "If"][:_top_k(nodes, inits)]
            outs = []
            for e, if_node in enumerate(ifs):
                x, gate_up, down = _branch_weights(if_node)
                p = f"{prefix}/floor/e{e}/"
                kept += [helper.make_node("MatMul", [x, gate_up], [p + "gu"]),
                         helper.make_node("Split", [p + "gu"], [p + "g", p + "u"], axis=-1, num_outputs=2),
                         helper.make_node("QuickGelu", [p + "g"], [p + "a"], domain="com.microsoft", alpha=1.0),
                         helper.make_node("Mul", [p + "a", p + "u"], [p + "m"]),
                         helper.make_node("MatMul", [p + "m", down], [p + "y"])]
                outs.append(p + "y")
            kept.append(helper.make_node("Sum", outs, [nodes[-1].output[0]]))
        elif id(node) not in dropped:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in kept for name in node.input}
    unread = [t for t in graph.initializer if t.name not in read]  # the routing's constants, experts 2..E-1
    for t in unread:
        graph.initializer.remove(t)
    no_routing = model_path.with_name("no_routing.onnx")
    onnx.save(model, str(no_routing))

    # matmuls alone, in the original graph's order (a layer's experts where its first If was)
    model = onnx.load(str(model_path), load_external_data=False)
    first_if = {next(n.name for n in nodes if n.op_type == "If"): nodes for nodes in layers.values()}
    weights = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            weights.append((node, inits[node.input[1]]))
        elif node.name in first_if:
            nodes = first_if[node.name]
            for if_node in [n for n in nodes if n.op_type == "If"][:_top_k(nodes, inits)]:
                _, gate_up, down = _branch_weights(if_node)
                weights += [(None, inits[gate_up]), (None, inits[down])]
    nodes, inputs, outputs, used = [], {}, [], []
    for i, (node, w) in enumerate(weights):
        trans_b = node is not None and any(a.name == "transB" and a.i for a in node.attribute)
        k = w.dims[1] if trans_b else w.dims[0]
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, [1, k]))
        out = f"y{i}"
        nodes.append(helper.make_node("Gemm", [f"x{k}", w.name], [out], transB=1) if trans_b else
                     helper.make_node("MatMul", [f"x{k}", w.name], [out]))
        outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        used.append(w)
    floor = helper.make_model(helper.make_graph(nodes, "matmuls", list(inputs.values()), outputs, used),
                              opset_imports=[helper.make_opsetid("", 21)])
    matmuls = model_path.with_name("matmuls.onnx")
    onnx.save(floor, str(matmuls))
    return no_routing, matmuls


class MatMulRunner:
    """The matmuls-alone graph as a row: a 'step' is one run of it (no cache, no logits)."""

    def __init__(self, path: Path, vocab: int):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = ds.THREADS, 1
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feeds = {i.name: np.ones(i.shape, np.float32) for i in self.sess.get_inputs()}
        self.binding = self.sess.io_binding()
        for name, value in self.feeds.items():
            self.binding.bind_cpu_input(name, value)
        for out in self.sess.get_outputs():
            self.binding.bind_output(out.name)
        self.logits = torch.zeros(1, 1, vocab)

    def prefill(self, ids, mask, pos):
        return self.logits, None

    def step(self, ids, mask, pos, state):
        self.sess.run_with_iobinding(self.binding)
        return self.logits, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                    help="a llama.cpp source tree (its convert_hf_to_gguf.py makes the GGUF)")
    ap.add_argument("--ort-moe-library", type=Path, default=None, metavar="LIB",
                    help="also time the ort graph built with this CPU MoE op library (row 'ours ort op')")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    torch.set_num_threads(ds.THREADS)
    print(ds.machine_info())
    work = Path(tempfile.mkdtemp(prefix="mixexport-floor-", dir=args.workdir))
    try:
        from mixexport.checkpoint import write_checkpoint
        c = ds.make_config("mid")
        ckpt, out = work / "ckpt", work / "out"
        write_checkpoint(ckpt, c, seed=0)
        exe = Path(sys.executable).with_name("mixexport")
        subprocess.run([str(exe), "build", str(ckpt), "-o", str(out), "--target", "ort", "--no-validate"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        model = out / "ort" / "model.onnx"
        no_routing, matmuls = write_ablations(model)
        kv = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        runners = {"ours ort": ds.OrtRunner(model, *kv), "no routing": ds.OrtRunner(no_routing, *kv),
                   "matmuls alone": MatMulRunner(matmuls, c.vocab_size)}
        if args.ort_moe_library:
            op_out = work / "out-op"
            subprocess.run([str(exe), "build", str(ckpt), "-o", str(op_out), "--target", "ort", "--no-validate",
                            "--ort-moe-library", str(args.ort_moe_library)], check=True, stdout=subprocess.DEVNULL)
            runners["ours ort op"] = ds.OrtRunner(op_out / "ort" / "model.onnx", *kv, library=args.ort_moe_library)
        if args.llama_cpp:
            gguf = work / "mid-f32.gguf"
            ds.convert_to_gguf(args.llama_cpp, ckpt, gguf)
            runners["llama.cpp f32"] = ds.LlamaCppRunner(gguf, args.prompt + args.steps + ds.WARMUP + 8)
        bandwidth = 0.0
        times: dict[str, list[float]] = {label: [] for label in runners}
        for r in range(args.rounds):
            bandwidth = max(bandwidth, ds.dram_bandwidth())
            for label, runner in runners.items():
                times[label].append(ds.time_runner(runner, 1, args.prompt, args.steps, c.vocab_size)[1])
            print(f"round {r + 1}: " + ", ".join(f"{label} {t[-1]:.2f}" for label, t in times.items()), flush=True)
        limit_ms = ds.dram_bytes(ds.active_bytes(c, 1), ds.cpu_caches()) / bandwidth * 1e3
        # Ratios within each round (the rows of a round ran minutes apart at most; the machine's speed
        # moves more than that between rounds), then their median.
        bases = [base for base in ("matmuls alone", "llama.cpp f32") if base in times]
        print(f"\nmid, batch 1, decode ms/step over {args.rounds} rounds of {args.steps} steps; bandwidth limit "
              f"{limit_ms:.2f} ms ({bandwidth / 1e9:.1f} GB/s, the best of the rounds' measurements)")
        print(f"{'row':<16} {'best':>7} {'median':>7} {'x limit':>8}" + "".join(f" {'x ' + b:>16}" for b in bases)
              + "   (x: the median over rounds of the ratio within a round)")
        for label in LABELS:
            if label in times:
                line = f"{label:<16} {min(times[label]):7.2f} {statistics.median(times[label]):7.2f} " \
                       f"{min(times[label]) / limit_ms:8.2f}"
                for base in bases:
                    ratio = statistics.median(t / u for t, u in zip(times[label], times[base]))
                    line += f" {ratio:16.2f}"
                print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
