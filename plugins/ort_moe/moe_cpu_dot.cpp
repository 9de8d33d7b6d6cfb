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

// NT tokens x one tile of kPanelTile columns: 2 * NT accumulators (12 at NT 6), two panel loads and
// NT broadcasts per k.
template <size_t NT>
__attribute__((always_inline)) inline void gemm_tile(const float* p, int64_t kc, const float* const* xs, float* c,
                                                     int64_t ldc) {
  v8 acc[NT][2] = {};
  for (int64_t k = 0; k < kc; ++k) {
    v8 w0 = load8(p + k * kPanelTile), w1 = load8(p + k * kPanelTile + 8);
    for (size_t t = 0; t < NT; ++t) {
      v8 x = xs[t][k] - v8{};  // a broadcast, as above
      acc[t][0] += x * w0;
      acc[t][1] += x * w1;
    }
  }
  for (size_t t = 0; t < NT; ++t) {
    for (int l = 0; l < 8; ++l) {
      c[t * ldc + l] += acc[t][0][l];
      c[t * ldc + 8 + l] += acc[t][1][l];
    }
  }
}

template <size_t NT>
__attribute__((always_inline)) inline void gemm_tiles(const float* p, int64_t kc, int64_t tiles,
                                                      const float* const* xs, float* c, int64_t ldc) {
  for (int64_t tile = 0; tile < tiles; ++tile) {
    gemm_tile<NT>(p + tile * kc * kPanelTile, kc, xs, c + tile * kPanelTile, ldc);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIXEXPORT_AVX512 1
// AVX-512: one 16-float register per tile row, two tiles a pass: 2 * NT accumulators of 32 registers.
typedef float v16 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <size_t NT, size_t W>
__attribute__((always_inline)) inline void gemm_tiles16(const float* p, int64_t kc, const float* const* xs, float* c,
                                                        int64_t ldc) {
  v16 acc[NT][W] = {};
  for (int64_t k = 0; k < kc; ++k) {
    v16 w[W];
    for (size_t i = 0; i < W; ++i) w[i] = load16(p + (static_cast<int64_t>(i) * kc + k) * kPanelTile);
    for (size_t t = 0; t < NT; ++t) {
      v16 x = xs[t][k] - v16{};  // a broadcast (x - 0 is x for every x; x + 0 is not, for -0)
      for (size_t i = 0; i < W; ++i) acc[t][i] += x * w[i];
    }
  }
  for (size_t t = 0; t < NT; ++t) {
    for (size_t i = 0; i < W; ++i) {
      for (int l = 0; l < 16; ++l) c[t * ldc + static_cast<int64_t>(i) * kPanelTile + l] += acc[t][i][l];
    }
  }
}

template <size_t NT>
__attribute__((always_inline)) inline void gemm_pairs16(const float* p, int64_t kc, int64_t tiles,
                                                        const float* const* xs, float* c, int64_t ldc) {
  int64_t tile = 0;
  for (; tile + 2 <= tiles; tile += 2) gemm_tiles16<NT, 2>(p + tile * kc * kPanelTile, kc, xs, c + tile * kPanelTile, ldc);
  if (tile < tiles) gemm_tiles16<NT, 1>(p + tile * kc * kPanelTile, kc, xs, c + tile * kPanelTile, ldc);
}

__attribute__((target("arch=x86-64-v4")))
void gemm_panel_avx512(const float* p, int64_t kc, int64_t tiles, const float* const* xs, size_t nt, float* c,
                       int64_t ldc) {
  switch (nt) {
    case 1: gemm_pairs16<1>(p, kc, tiles, xs, c, ldc); break;
    case 2: gemm_pairs16<2>(p, kc, tiles, xs, c, ldc); break;
    case 3: gemm_pairs16<3>(p, kc, tiles, xs, c, ldc); break;
    case 4: gemm_pairs16<4>(p, kc, tiles, xs, c, ldc); break;
    case 5: gemm_pairs16<5>(p, kc, tiles, xs, c, ldc); break;
    default: gemm_pairs16<6>(p, kc, tiles, xs, c, ldc); break;
  }
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void gemm_panel_v8(const float* p, int64_t kc, int64_t tiles, const float* const* xs, size_t nt, float* c,
                   int64_t ldc) {
  switch (nt) {
    case 1: gemm_tiles<1>(p, kc, tiles, xs, c, ldc); break;
    case 2: gemm_tiles<2>(p, kc, tiles, xs, c, ldc); break;
    case 3: gemm_tiles<3>(p, kc, tiles, xs, c, ldc); break;
    case 4: gemm_tiles<4>(p, kc, tiles, xs, c, ldc); break;
    case 5: gemm_tiles<5>(p, kc, tiles, xs, c, ldc); break;
    default: gemm_tiles<6>(p, kc, tiles, xs, c, ldc); break;
  }
}

}  // namespace

void gemm_panel(const float* p, int64_t kc, int64_t tiles, const float* const* xs, size_t nt, float* c, int64_t ldc) {
#ifdef MIXEXPORT_AVX512
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  if (avx512) {
    gemm_panel_avx512(p, kc, tiles, xs, nt, c, ldc);
    return;
  }
#endif
  gemm_panel_v8(p, kc, tiles, xs, nt, c, ldc);
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
