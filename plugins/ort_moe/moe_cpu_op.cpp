// mixexport.MoE as an onnxruntime CPU custom op: the captured node, unlowered, in one kernel.
//
// Why: onnxruntime's own CPU MoE kernel gives each thread a fixed share of the experts, so at
// top-2 the two chosen experts of a decode step often share one thread; the standard-ONNX form
// (one If per expert) spreads each MatMul over all threads but runs a dozen small serial kernels
// per expert around it. This kernel splits every chosen expert's rows over onnxruntime's own
// intra-op pool (KernelContext_ParallelFor), as llama.cpp does, with the routing in the same node.
// Two stages, each one ParallelFor (after a third that transposes a prefill's tokens): gate/up + SiLU over (active expert x block of 64 intermediate
// rows), then down over blocks of 64 hidden rows, experts added in ascending order. An expert with
// few tokens (decode) reads each weight row once for up to four tokens, one row after another; one
// with many (prefill) has its tokens transposed into groups of 32 and broadcasts every weight,
// where it lies, to a whole group (a register-blocked kernel, moe_cpu_dot.cpp; AVX-512 where the
// CPU has it): the weights are never copied.
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
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moe_cpu_dot.h"

namespace {

constexpr const char* kDomain = "mixexport.ort";

struct Routed {
  // Per expert: the (token, weight) pairs routed to it, in token order.
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::vector<float>> weights;
  std::vector<int64_t> active;  // experts with at least one token, ascending
};

// The reference's routing (moe.py `route`): softmax in float32, stable descending order.
void route(const float* logits, int64_t n, int64_t e, int64_t k, bool normalize, Routed& r) {
  r.tokens.assign(e, {});
  r.weights.assign(e, {});
  std::vector<float> p(e);
  std::vector<int64_t> order(e);
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
    }
  }
  for (int64_t ex = 0; ex < e; ++ex) {
    if (!r.tokens[ex].empty()) r.active.push_back(ex);
  }
}

// Rows of one work item: enough to amortise the dispatch, few enough to spread a decode step's
// two experts over every thread (mid: I 1792 -> 28 items an expert; 8x7B: I 14336 -> 224).
constexpr int64_t kRowsPerItem = 64;
// Rows of a tile inside a direct-path item with more than one pass of tokens: its weights stay in
// L2 while every pass of kTokensPerPass tokens reads them (16 intermediate rows are 2 x 16 rows of
// H floats, 512 KB at H 4096; 8 rows of w_down 8 rows of I floats, 458 KB at I 14336).
constexpr int64_t kGateUpTile = 16;
constexpr int64_t kDownTile = 8;
constexpr size_t kPass = mixexport::kTokensPerPass;
// From this many tokens an expert takes the many-token path (a prefill's experts): its tokens
// transposed into groups of kTokenGroup, every weight broadcast to a group (`gemm_rows`), K in
// chunks of kChunkK so a group's chunk (32 KB) and the item's rows of it stay in cache while
// every row block reads them. Below it (decode, short prompts) each weight row is read once per
// four tokens (`dot_tokens`): a group of 32 at 8 tokens would compute 24 columns of padding.
constexpr size_t kPackMin = 16;
constexpr int64_t kChunkK = 256;
constexpr size_t kRowBlock = 6;  // weight rows a gemm_rows call: its pointer array
constexpr int64_t kG = mixexport::kTokenGroup;

int64_t groups(size_t tokens) { return (static_cast<int64_t>(tokens) + kG - 1) / kG; }

struct Job {
  const float* x;
  const float* w_gate_up;
  const float* w_down;
  float* y;
  int64_t h, inter;
  const Routed* r;
  // Per expert, where its activations start in `act`: a direct-path expert's are [T, I] (token
  // rows); a many-token expert's [G, I, kG] (groups of token columns, zero past its tokens), which
  // stage 2 reads as it is; its transposed input rows, [G, H, kG], start at xt + xt_off[ex].
  float* act;
  float* xt;
  std::vector<int64_t> act_off, xt_off;
  std::vector<std::pair<int64_t, int64_t>> xt_items;  // the (expert, group) pairs to transpose
  // Stage 1 items: (active expert, intermediate block) flattened.
  int64_t blocks_i;
  int64_t blocks_h;
  bool many(int64_t ex) const { return r->tokens[ex].size() >= kPackMin; }
};

// One group of a many-token expert's input rows, transposed: xt[(g * H + k) * kG + l] = x[token l][k].
void transpose_item(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  auto [ex, g] = j.xt_items[index];
  const auto& tokens = j.r->tokens[ex];
  float* xt = j.xt + j.xt_off[ex] + g * j.h * kG;
  int64_t n = std::min<int64_t>(kG, static_cast<int64_t>(tokens.size()) - g * kG);
  for (int64_t l = 0; l < n; ++l) {
    const float* row = j.x + tokens[g * kG + l] * j.h;
    for (int64_t k = 0; k < j.h; ++k) xt[k * kG + l] = row[k];
  }
  for (int64_t l = n; l < kG; ++l) {
    for (int64_t k = 0; k < j.h; ++k) xt[k * kG + l] = 0.f;
  }
}

// c[r][g * kG + l] (ldc = G * kG) = sum over K of row(r)[k] * xt_g[k][l], for rows r < nrows of the
// item and every group: K in chunks, each chunk's rows read once a group while its group chunk
// stays in L1/L2. The weights come from memory during the first group's pass, the next row
// block's prefetched while one is multiplied (one mid layer at 64 tokens, two runs each way:
// gate/up 4.4-5.6 -> 3.9-4.2 ms, down 2.4-2.8 -> 1.9 ms).
template <class Row>
const std::vector<float>& many_token_gemm(Row row, int64_t nrows, int64_t k, const float* xt, int64_t g_count) {
  thread_local std::vector<float> c;
  int64_t ldc = g_count * kG;
  c.assign(static_cast<size_t>(nrows * ldc), 0.f);
  for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
    int64_t kc = std::min(kChunkK, k - k0);
    for (int64_t g = 0; g < g_count; ++g) {
      const float* xg = xt + (g * k + k0) * kG;
      for (int64_t r0 = 0; r0 < nrows; r0 += static_cast<int64_t>(kRowBlock)) {
        size_t nr = static_cast<size_t>(std::min(static_cast<int64_t>(kRowBlock), nrows - r0));
        const float* ws[kRowBlock];
        for (size_t q = 0; q < nr; ++q) ws[q] = row(r0 + static_cast<int64_t>(q)) + k0;
        if (g == 0) {  // the first group brings the chunk in from memory: ask for the next block's rows now
          int64_t next_end = std::min(nrows, r0 + 2 * static_cast<int64_t>(kRowBlock));
          for (int64_t rr = r0 + static_cast<int64_t>(kRowBlock); rr < next_end; ++rr) {
            const char* line = reinterpret_cast<const char*>(row(rr) + k0);
            for (int64_t b = 0; b < kc * static_cast<int64_t>(sizeof(float)); b += 64) __builtin_prefetch(line + b);
          }
        }
        mixexport::gemm_rows(ws, nr, xg, kc, c.data() + r0 * ldc + g * kG, ldc);
      }
    }
  }
  return c;
}

float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

void gate_up_item(void* data, size_t index) {
  const Job& j = *static_cast<const Job*>(data);
  int64_t ex = j.r->active[index / j.blocks_i];
  int64_t i0 = static_cast<int64_t>(index % j.blocks_i) * kRowsPerItem;
  int64_t i1 = std::min(i0 + kRowsPerItem, j.inter);
  const float* w = j.w_gate_up + ex * 2 * j.inter * j.h;
  const auto& tokens = j.r->tokens[ex];
  float* act = j.act + j.act_off[ex];
  if (j.many(ex)) {
    int64_t n = i1 - i0, g_count = groups(tokens.size()), ldc = g_count * kG;
    // The item's gate rows, then its up rows: rows [0, n) of c are gate, [n, 2n) up.
    auto row = [&](int64_t r) { return w + (r < n ? i0 + r : j.inter + i0 + r - n) * j.h; };
    const auto& c = many_token_gemm(row, 2 * n, j.h, j.xt + j.xt_off[ex], g_count);
    for (int64_t g = 0; g < g_count; ++g) {
      for (int64_t i = 0; i < n; ++i) {
        const float* cg = c.data() + i * ldc + g * kG;
        const float* cu = c.data() + (n + i) * ldc + g * kG;
        float* out = act + (g * j.inter + i0 + i) * kG;
        for (int64_t l = 0; l < kG; ++l) out[l] = silu_mul(cg[l], cu[l]);  // padding: silu(0) * 0
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
          act[static_cast<int64_t>(s + q) * j.inter + i] = silu_mul(g[(i - t0) * kPass + q], u[q]);
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
    const auto& weights = j.r->weights[ex];
    const float* act = j.act + j.act_off[ex];
    if (j.many(ex)) {
      int64_t g_count = groups(tokens.size()), ldc = g_count * kG;
      auto row = [&](int64_t r) { return w + (h0 + r) * j.inter; };
      const auto& c = many_token_gemm(row, h1 - h0, j.inter, act, g_count);
      for (size_t t = 0; t < tokens.size(); ++t) {
        const float* ct = c.data() + static_cast<int64_t>(t);  // column t: group t / kG, lane t % kG
        float* out = j.y + tokens[t] * j.h;
        for (int64_t hh = h0; hh < h1; ++hh) out[hh] += weights[t] * ct[(hh - h0) * ldc];
      }
      continue;
    }
    int64_t tile = tokens.size() > kPass ? kDownTile : kRowsPerItem;
    for (int64_t t0 = h0; t0 < h1; t0 += tile) {
      int64_t t1 = std::min(t0 + tile, h1);
      for (size_t s = 0; s < tokens.size(); s += kPass) {
        size_t nt = std::min(tokens.size() - s, kPass);
        const float* as[kPass];
        for (size_t q = 0; q < nt; ++q) as[q] = act + static_cast<int64_t>(s + q) * j.inter;
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
    Job job{x.GetTensorData<float>(), wgu.GetTensorData<float>(), wd.GetTensorData<float>(), out, h, inter, &r,
            nullptr, nullptr, std::vector<int64_t>(e), std::vector<int64_t>(e), {},
            (inter + kRowsPerItem - 1) / kRowsPerItem, (h + kRowsPerItem - 1) / kRowsPerItem};
    int64_t act_size = 0, xt_size = 0;
    for (int64_t ex : r.active) {
      int64_t t = static_cast<int64_t>(r.tokens[ex].size());
      job.act_off[ex] = act_size;
      if (job.many(ex)) {
        int64_t g_count = groups(r.tokens[ex].size());
        job.xt_off[ex] = xt_size;
        xt_size += g_count * kG * h;
        act_size += g_count * kG * inter;
        for (int64_t g = 0; g < g_count; ++g) job.xt_items.emplace_back(ex, g);
      } else {
        act_size += t * inter;
      }
    }
    // Uninitialised: every element is written before it is read (stage 1 writes every activation,
    // padding included; the transpose every input column), and a prefill's scratch is large
    // (Mixtral-8x7B, 4096 tokens: 600 MB a layer, which zeroing would sweep once more).
    std::unique_ptr<float[]> act(new float[static_cast<size_t>(act_size)]), xt(new float[static_cast<size_t>(xt_size)]);
    job.act = act.get();
    job.xt = xt.get();
    if (!job.xt_items.empty()) ctx.ParallelFor(transpose_item, job.xt_items.size(), 0, &job);
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
