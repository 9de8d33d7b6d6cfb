// The MoE op's dot products, compiled per x86-64 level (AVX-512, AVX2 + FMA, baseline) and picked
// at load time by the ifunc resolver GCC and Clang emit for target_clones: one library runs on any
// x86-64 machine at the speed of the one it is on.
#include "moe_cpu_dot.h"

#include <cstring>

namespace mixexport {
namespace {

typedef float v8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline float hsum(v8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// One weight row x NT tokens, U independent accumulators a token: the row and the token rows are
// read once. U 4 at one token (decode) keeps four multiply-add chains and 128 bytes of the row in
// flight an iteration; fewer where NT * U chains already fill AVX2's 16 registers.
template <size_t NT, size_t U>
__attribute__((always_inline)) inline void dot_row(const float* w, const float* const* xs, int64_t k, float* out) {
  v8 acc[U][NT] = {};
  int64_t i = 0;
  for (; i + static_cast<int64_t>(8 * U) <= k; i += 8 * U) {
    for (size_t u = 0; u < U; ++u) {
      v8 wv = load8(w + i + 8 * u);
      for (size_t q = 0; q < NT; ++q) acc[u][q] += wv * load8(xs[q] + i + 8 * u);
    }
  }
  for (; i + 8 <= k; i += 8) {  // fewer than 8 * U left: blocks of 8
    v8 wv = load8(w + i);
    for (size_t q = 0; q < NT; ++q) acc[0][q] += wv * load8(xs[q] + i);
  }
  for (size_t q = 0; q < NT; ++q) {
    v8 sum = acc[0][q];
    for (size_t u = 1; u < U; ++u) sum += acc[u][q];
    float s = hsum(sum);
    for (int64_t t = i; t < k; ++t) s += w[t] * xs[q][t];
    out[q] = s;
  }
}

// NR weight rows x one group of tokens: NR * (kTokenGroup / lanes) accumulators (12 both on
// AVX-512, 6 rows x 2 registers, and on AVX2, 3 x 4), kTokenGroup / lanes loads and NR broadcasts
// per k.
template <class V, size_t NR>
__attribute__((always_inline)) inline void rows_block(const float* const* ws, const float* xt, int64_t kc, float* c,
                                                      int64_t ldc) {
  constexpr size_t kLanes = sizeof(V) / sizeof(float);
  constexpr size_t kNv = kTokenGroup / kLanes;
  V acc[NR][kNv] = {};
  for (int64_t k = 0; k < kc; ++k) {
    V x[kNv];
    for (size_t v = 0; v < kNv; ++v) std::memcpy(&x[v], xt + k * kTokenGroup + v * kLanes, sizeof(V));
    for (size_t i = 0; i < NR; ++i) {
      V b = ws[i][k] - V{};  // a broadcast (x - 0 is x for every x; x + 0 is not, for -0)
      for (size_t v = 0; v < kNv; ++v) acc[i][v] += b * x[v];
    }
  }
  for (size_t i = 0; i < NR; ++i) {
    for (size_t v = 0; v < kNv; ++v) {
      for (size_t l = 0; l < kLanes; ++l) c[static_cast<int64_t>(i) * ldc + v * kLanes + l] += acc[i][v][l];
    }
  }
}

// Rows in blocks of R, the last block narrower.
template <class V, size_t R>
__attribute__((always_inline)) inline void rows_all(const float* const* ws, size_t nr, const float* xt, int64_t kc,
                                                    float* c, int64_t ldc) {
  size_t i = 0;
  for (; i + R <= nr; i += R) rows_block<V, R>(ws + i, xt, kc, c + static_cast<int64_t>(i) * ldc, ldc);
  float* ci = c + static_cast<int64_t>(i) * ldc;
  switch (nr - i) {
    case 0: break;
    case 1: rows_block<V, 1>(ws + i, xt, kc, ci, ldc); break;
    case 2: if constexpr (R > 2) rows_block<V, 2>(ws + i, xt, kc, ci, ldc); break;
    case 3: if constexpr (R > 3) rows_block<V, 3>(ws + i, xt, kc, ci, ldc); break;
    case 4: if constexpr (R > 4) rows_block<V, 4>(ws + i, xt, kc, ci, ldc); break;
    default: if constexpr (R > 5) rows_block<V, 5>(ws + i, xt, kc, ci, ldc); break;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIXEXPORT_AVX512 1
typedef float v16 __attribute__((vector_size(64)));

__attribute__((target("arch=x86-64-v4")))
void gemm_rows_avx512(const float* const* ws, size_t nr, const float* xt, int64_t kc, float* c, int64_t ldc) {
  rows_all<v16, 6>(ws, nr, xt, kc, c, ldc);
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void gemm_rows_v8(const float* const* ws, size_t nr, const float* xt, int64_t kc, float* c, int64_t ldc) {
  rows_all<v8, 3>(ws, nr, xt, kc, c, ldc);
}

}  // namespace

void gemm_rows(const float* const* ws, size_t nr, const float* xt, int64_t kc, float* c, int64_t ldc) {
#ifdef MIXEXPORT_AVX512
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  if (avx512) {
    gemm_rows_avx512(ws, nr, xt, kc, c, ldc);
    return;
  }
#endif
  gemm_rows_v8(ws, nr, xt, kc, c, ldc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void dot_tokens(const float* w, const float* const* xs, size_t nt, int64_t k, float* out) {
  switch (nt) {
    case 1: dot_row<1, 4>(w, xs, k, out); break;
    case 2: dot_row<2, 2>(w, xs, k, out); break;
    case 3: dot_row<3, 2>(w, xs, k, out); break;
    default: dot_row<4, 2>(w, xs, k, out); break;
  }
}

}  // namespace mixexport
