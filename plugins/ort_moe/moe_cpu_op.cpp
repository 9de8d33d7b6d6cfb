// mixexport.MoE as an onnxruntime CPU custom op: the captured node, unlowered, in one kernel.
//
// Why: onnxruntime's own CPU MoE kernel gives each thread a fixed share of the experts, so at
// top-2 the two chosen experts of a decode step often share one thread; the standard-ONNX form
// (one If per expert) spreads each MatMul over all threads but runs a dozen small serial kernels
// per expert around it. This kernel splits every chosen expert's rows over onnxruntime's own
// intra-op pool (KernelContext_ParallelFor), as llama.cpp does, with the routing in the same node.
// Two stages, each one ParallelFor: gate/up + SiLU over (active expert x block of 64 intermediate
// rows), then down over blocks of 64 hidden rows, experts added in ascending order. An expert with
// few tokens (decode) reads each weight row once for up to four tokens, two rows at a time; one
// with many (prefill) packs its block of weights into L2-sized panels and multiplies them with a
// register-blocked broadcast kernel (moe_cpu_dot.cpp; AVX-512 where the CPU has it).
//
// Semantics are mixexport/model/moe.py's (the MoE op reference), float32 only:
//   inputs  x [N, H], router_logits [N, E], w_gate_up [E, 2I, H] (gate rows, then up rows),
//           w_down [E, H, I]; attributes top_k (1..E), normalize (0/1); output y [N, H].
//   A token whose logits have no softmax (a NaN or +inf, or all -inf) gets experts 0..K-1 with
//   NaN weights, so its whole output row is NaN. Ties go to the lower expert index.
//
// Load it with SessionOptions.register_custom_ops_library (onnxruntime-genai: the config's
// custom_ops_library). Built against onnxruntime's C API headers (ORT_API_VERSION 17 or later:
// the oldest with KernelContext_ParallelFor); the C API is versioned, so one build serves newer
// onnxruntime releases too.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moe_cpu_dot.h"

namespace {

constexpr const char* kDomain = "mixexport.ort";

struct Routed {
  // Per expert: the (token, weight, act row) triples routed to it, in token order.
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::vector<float>> weights;
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> active;  // experts with at least one token, ascending
};

// The reference's routing (moe.py `route`): softmax in float32, stable descending order.
void route(const float* logits, int64_t n, int64_t e, int64_t k, bool normalize, Routed& r) {
  r.tokens.assign(e, {});
  r.weights.assign(e, {});
  r.rows.assign(e, {});
  std::vector<float> p(e);
  std::vector<int64_t> order(e);
  int64_t row = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* l = logits + t * e;
    float m = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t j = 0; j < e; ++j) {
      if (std::isnan(l[j])) nan = true;
      m = std::max(m, l[j]);
    }
    // No softmax: a NaN, a +inf (inf - inf is NaN) or every logit -inf (0/0).
    bool no_softmax = nan || std::isinf(m);
    float sum = 0.f;
    if (!no_softmax) {
      for (int64_t j = 0; j < e; ++j) sum += (p[j] = std::exp(l[j] - m));
      for (int64_t j = 0; j < e; ++j) p[j] /= sum;
    }
    for (int64_t j = 0; j < e; ++j) order[j] = j;
    if (!no_softmax) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    }
    float kept = 0.f;
    for (int64_t j = 0; j < k; ++j) kept += p[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      int64_t ex = order[j];
      float w = no_softmax ? std::numeric_limits<float>::quiet_NaN() : (normalize ? p[ex] / kept : p[ex]);
      r.tokens[ex].push_back(t);
      r.weights[ex].push_back(w);
      r.rows[ex].push_back(row++);
    }
  }
  for (int64_t ex = 0; ex < e; ++ex) {
    if (!r.tokens[ex].empty()) r.active.push_back(ex);
  }
}

// Rows of one work item: enough to amortise the dispatch, few enough to spread a decode step's
// two experts over every thread (mid: I 1792 -> 28 items an expert; 8x7B: I 14336 -> 224).
constexpr int64_t kRowsPerItem = 64;
// Rows of a tile inside an item: its weights stay in L2 while every pass of kTokensPerPass tokens
// reads them (a prefill's expert has many tokens): 16 intermediate rows are 2 x 16 rows of H floats
// (512 KB at H 4096), 8 rows of w_down 8 rows of I floats (458 KB at I 14336). A decode step has
// one pass: the same loop.
constexpr int64_t kGateUpTile = 16;
constexpr int64_t kDownTile = 8;

struct Job {
  const float* x;
  const float* w_gate_up;
  const float* w_down;
  float* y;
  float* act;  // [N*K, I]
  int64_t h, inter;
  const Routed* r;
  // Stage 1 items: (active expert, intermediate block) flattened.
  int64_t blocks_i;
  int64_t blocks_h;
};

constexpr size_t kPass = mixexport::kTokensPerPass;
// From this many tokens an expert takes the packed path (a prefill's experts): its weight block is
// packed, kPanelK of K at a time, into a panel that every group of kGemmTokens tokens multiplies
// from L2 (`gemm_panel`). Below it (decode, short prompts) each weight row is read straight from
// memory once per four tokens: packing costs about as much as two such passes (measured with
// benchmarks/moe_cpu_op.py: at 8 tokens an expert the direct path was faster, at 32 the packed one).
constexpr size_t kPackMin = 16;
constexpr int64_t kPanelK = 256;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Rows [r0, r1) of row-major w (row length ld), columns [k0, k0 + kc), into panel tiles (the
// layout `gemm_panel` reads), rows past r1 in the last tile zero: each tile written in order, its
// kPanelTile rows read side by side.
void pack(const float* w, int64_t ld, int64_t r0, int64_t r1, int64_t k0, int64_t kc, float* p) {
  for (int64_t tr = r0; tr < r1; tr += mixexport::kPanelTile, p += kc * mixexport::kPanelTile) {
    int64_t n = std::min(mixexport::kPanelTile, r1 - tr);
    const float* src[mixexport::kPanelTile];
    for (int64_t l = 0; l < n; ++l) src[l] = w + (tr + l) * ld + k0;
    for (int64_t k = 0; k < kc; ++k) {
      float* dst = p + k * mixexport::kPanelTile;
      int64_t l = 0;
      for (; l < n; ++l) dst[l] = src[l][k];
      for (; l < mixexport::kPanelTile; ++l) dst[l] = 0.f;
    }
  }
}

// One thread's packed-path scratch: the panel, the product c [T][ncols] (columns: the block's rows,
// then with a second block its rows from `half` on), and the token rows' offsets.
struct Packed {
  std::vector<float> panel, c;
  std::vector<int64_t> offsets;
  int64_t ncols = 0, half = 0;
};

// c = (the token rows ids[t] * stride of `base`) x (rows [r0, r1) of w, and of w `second` rows below
// when second > 0, side by side), K = k in kPanelK chunks; into this thread's scratch.
const Packed& packed_gemm(const float* w, int64_t k, int64_t r0, int64_t r1, int64_t second, const float* base,
                          const std::vector<int64_t>& ids, int64_t stride) {
  thread_local Packed s;
  s.half = round_up(r1 - r0, mixexport::kPanelTile);
  s.ncols = second > 0 ? 2 * s.half : s.half;
  int64_t tiles = s.ncols / mixexport::kPanelTile;
  size_t t_count = ids.size();
  s.offsets.resize(t_count);
  for (size_t t = 0; t < t_count; ++t) s.offsets[t] = ids[t] * stride;
  s.panel.resize(static_cast<size_t>(std::min(kPanelK, k) * s.ncols));
  s.c.assign(t_count * static_cast<size_t>(s.ncols), 0.f);
  for (int64_t k0 = 0; k0 < k; k0 += kPanelK) {
    int64_t kc = std::min(kPanelK, k - k0);
    pack(w, k, r0, r1, k0, kc, s.panel.data());
    if (second > 0) pack(w, k, second + r0, second + r1, k0, kc, s.panel.data() + s.half * kc);
    for (size_t g = 0; g < t_count; g += mixexport::kGemmTokens) {
      size_t nt = std::min(t_count - g, mixexport::kGemmTokens);
      const float* xs[mixexport::kGemmTokens];
      for (size_t q = 0; q < nt; ++q) xs[q] = base + s.offsets[g + q] + k0;
      mixexport::gemm_panel(s.panel.data(), kc, tiles, xs, nt, s.c.data() + g * s.ncols, s.ncols);
    }
  }
  return s;
}

void gate_up_item(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  int64_t ex = j.r->active[index / j.blocks_i];
  int64_t i0 = static_cast<int64_t>(index % j.blocks_i) * kRowsPerItem;
  int64_t i1 = std::min(i0 + kRowsPerItem, j.inter);
  const float* w = j.w_gate_up + ex * 2 * j.inter * j.h;
  const auto& tokens = j.r->tokens[ex];
  const auto& rows = j.r->rows[ex];
  if (tokens.size() >= kPackMin) {
    const Packed& p = packed_gemm(w, j.h, i0, i1, j.inter, j.x, tokens, j.h);  // gate | up columns
    for (size_t t = 0; t < tokens.size(); ++t) {
      const float* ct = p.c.data() + t * p.ncols;
      float* out = j.act + rows[t] * j.inter;
      for (int64_t i = i0; i < i1; ++i) {
        float g = ct[i - i0], u = ct[p.half + i - i0];
        out[i] = g / (1.f + std::exp(-g)) * u;
      }
    }
    return;
  }
  // One pass of tokens (decode): the item's gate rows, then its up rows, each one sequential stream.
  // More: tiles whose rows stay in L2 while every pass reads them.
  int64_t tile = tokens.size() > kPass ? kGateUpTile : kRowsPerItem;
  float g[kRowsPerItem * kPass];
  for (int64_t t0 = i0; t0 < i1; t0 += tile) {
    int64_t t1 = std::min(t0 + tile, i1);
    for (size_t s = 0; s < tokens.size(); s += kPass) {
      size_t nt = std::min(tokens.size() - s, kPass);
      const float* xs[kPass];
      for (size_t q = 0; q < nt; ++q) xs[q] = j.x + tokens[s + q] * j.h;
      for (int64_t i = t0; i < t1; ++i) mixexport::dot_tokens(w + i * j.h, xs, nt, j.h, g + (i - t0) * kPass);
      for (int64_t i = t0; i < t1; ++i) {
        float u[kPass];
        mixexport::dot_tokens(w + (j.inter + i) * j.h, xs, nt, j.h, u);
        for (size_t q = 0; q < nt; ++q) {
          float gi = g[(i - t0) * kPass + q];
          j.act[rows[s + q] * j.inter + i] = gi / (1.f + std::exp(-gi)) * u[q];
        }
      }
    }
  }
}

void down_item(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  int64_t h0 = static_cast<int64_t>(index) * kRowsPerItem;
  int64_t h1 = std::min(h0 + kRowsPerItem, j.h);
  // Experts in ascending order, as the reference adds them.
  for (int64_t ex : j.r->active) {
    const float* w = j.w_down + ex * j.h * j.inter;
    const auto& tokens = j.r->tokens[ex];
    const auto& rows = j.r->rows[ex];
    const auto& weights = j.r->weights[ex];
    if (tokens.size() >= kPackMin) {
      const Packed& p = packed_gemm(w, j.inter, h0, h1, 0, j.act, rows, j.inter);
      for (size_t t = 0; t < tokens.size(); ++t) {
        const float* ct = p.c.data() + t * p.ncols;
        float* out = j.y + tokens[t] * j.h;
        for (int64_t hh = h0; hh < h1; ++hh) out[hh] += weights[t] * ct[hh - h0];
      }
      continue;
    }
    int64_t tile = tokens.size() > kPass ? kDownTile : kRowsPerItem;
    for (int64_t t0 = h0; t0 < h1; t0 += tile) {
      int64_t t1 = std::min(t0 + tile, h1);
      for (size_t s = 0; s < tokens.size(); s += kPass) {
        size_t nt = std::min(tokens.size() - s, kPass);
        const float* as[kPass];
        for (size_t q = 0; q < nt; ++q) as[q] = j.act + rows[s + q] * j.inter;
        for (int64_t hh = t0; hh < t1; ++hh) {
          float d[kPass];
          mixexport::dot_tokens(w + hh * j.inter, as, nt, j.inter, d);
          for (size_t q = 0; q < nt; ++q) j.y[tokens[s + q] * j.h + hh] += weights[s + q] * d[q];
        }
      }
    }
  }
}

struct MoEKernel {
  int64_t top_k = 0;
  bool normalize = true;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Compute(raw);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    auto x = ctx.GetInput(0), logits = ctx.GetInput(1), wgu = ctx.GetInput(2), wd = ctx.GetInput(3);
    auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    auto ls = logits.GetTensorTypeAndShapeInfo().GetShape();
    auto gs = wgu.GetTensorTypeAndShapeInfo().GetShape();
    auto ds = wd.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.size() != 2 || ls.size() != 2 || gs.size() != 3 || ds.size() != 3) {
      throw Ort::Exception("mixexport.MoE: expected x [N, H], router_logits [N, E], w_gate_up [E, 2I, H], "
                           "w_down [E, H, I]", ORT_INVALID_ARGUMENT);
    }
    int64_t n = xs[0], h = xs[1], e = ls[1], inter = gs[1] / 2;
    if (ls[0] != n || gs[0] != e || gs[1] != 2 * inter || gs[2] != h || ds[0] != e || ds[1] != h ||
        ds[2] != inter) {
      throw Ort::Exception("mixexport.MoE: input shapes disagree (x [" + std::to_string(n) + ", " +
                               std::to_string(h) + "], router_logits [" + std::to_string(ls[0]) + ", " +
                               std::to_string(e) + "], w_gate_up [" + std::to_string(gs[0]) + ", " +
                               std::to_string(gs[1]) + ", " + std::to_string(gs[2]) + "], w_down [" +
                               std::to_string(ds[0]) + ", " + std::to_string(ds[1]) + ", " +
                               std::to_string(ds[2]) + "])",
                           ORT_INVALID_ARGUMENT);
    }
    if (top_k > e) {
      throw Ort::Exception("mixexport.MoE: top_k " + std::to_string(top_k) + " > experts " + std::to_string(e),
                           ORT_INVALID_ARGUMENT);
    }
    auto y = ctx.GetOutput(0, xs);
    float* out = y.GetTensorMutableData<float>();
    std::fill(out, out + n * h, 0.f);
    if (n == 0 || h == 0) return;

    Routed r;
    route(logits.GetTensorData<float>(), n, e, top_k, normalize, r);
    std::vector<float> act(static_cast<size_t>(n * top_k * inter));
    Job job{x.GetTensorData<float>(), wgu.GetTensorData<float>(), wd.GetTensorData<float>(), out, act.data(),
            h, inter, &r, (inter + kRowsPerItem - 1) / kRowsPerItem, (h + kRowsPerItem - 1) / kRowsPerItem};
    if (inter > 0) {
      ctx.ParallelFor(gate_up_item, static_cast<size_t>(r.active.size() * job.blocks_i), 0, &job);
    }
    ctx.ParallelFor(down_item, static_cast<size_t>(job.blocks_h), 0, &job);
  }
};

struct MoEOp : Ort::CustomOpBase<MoEOp, MoEKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      Ort::ConstKernelInfo ki(info);
      auto k = new MoEKernel;
      k->top_k = ki.GetAttribute<int64_t>("top_k");
      k->normalize = ki.GetAttribute<int64_t>("normalize") != 0;
      if (k->top_k < 1) {
        int64_t bad = k->top_k;
        delete k;
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
                                          ("mixexport.MoE: top_k " + std::to_string(bad) + " < 1").c_str());
      }
      *kernel = k;
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return "MoE"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An onnxruntime older than these headers: its GetApi returns null for a newer version.
    return nullptr == api_base->GetApi(17) ? nullptr : api_base->GetApi(17)->CreateStatus(
        ORT_FAIL, "mixexport MoE op: this onnxruntime is older than the headers the library was built with");
  }
  Ort::InitApi(api);
  static MoEOp op;
  try {
    // One domain for every session, made once (a static's initialisation is thread-safe; one that
    // threw is tried again on the next call).
    static Ort::CustomOpDomain& domain = []() -> Ort::CustomOpDomain& {
      static Ort::CustomOpDomain d{kDomain};
      d.Add(&op);
      return d;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
