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

// NW weight rows x NT tokens, U independent accumulators each: every row and token row of K floats
// is read once. U = 2 where there are few chains (decode: one token), so the multiply-adds do not
// wait on each other; 1 where NW * NT chains already fill the registers (AVX2 has 16).
template <size_t NW, size_t NT, size_t U>
__attribute__((always_inline)) inline void dot_block(const float* const* ws, const float* const* xs, int64_t k,
                                                     float* out) {
  v8 acc[U][NW][NT] = {};
  int64_t i = 0;
  for (; i + static_cast<int64_t>(8 * U) <= k; i += 8 * U) {
    for (size_t u = 0; u < U; ++u) {
      v8 w[NW];
      for (size_t r = 0; r < NW; ++r) w[r] = load8(ws[r] + i + 8 * u);
      for (size_t q = 0; q < NT; ++q) {
        v8 x = load8(xs[q] + i + 8 * u);
        for (size_t r = 0; r < NW; ++r) acc[u][r][q] += w[r] * x;
      }
    }
  }
  for (; i + 8 <= k; i += 8) {  // U = 2: one block of 8 left
    v8 w[NW];
    for (size_t r = 0; r < NW; ++r) w[r] = load8(ws[r] + i);
    for (size_t q = 0; q < NT; ++q) {
      v8 x = load8(xs[q] + i);
      for (size_t r = 0; r < NW; ++r) acc[0][r][q] += w[r] * x;
    }
  }
  for (size_t r = 0; r < NW; ++r) {
    for (size_t q = 0; q < NT; ++q) {
      v8 sum = acc[0][r][q];
      for (size_t u = 1; u < U; ++u) sum += acc[u][r][q];
      float s = hsum(sum);
      for (int64_t t = i; t < k; ++t) s += ws[r][t] * xs[q][t];
      out[r * NT + q] = s;
    }
  }
}

template <size_t NW>
__attribute__((always_inline)) inline void dot_tokens(const float* const* ws, const float* const* xs, size_t nt,
                                                      int64_t k, float* out) {
  switch (nt) {
    case 1: dot_block<NW, 1, 2>(ws, xs, k, out); break;
    case 2: dot_block<NW, 2, 2>(ws, xs, k, out); break;
    case 3: dot_block<NW, 3, 1>(ws, xs, k, out); break;
    default: dot_block<NW, 4, 1>(ws, xs, k, out); break;
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
      v8 x = v8{} + xs[t][k];
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
      v16 x = v16{} + xs[t][k];
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
void dot_rows_tokens(const float* const* ws, size_t nw, const float* const* xs, size_t nt, int64_t k, float* out) {
  if (nw >= 2) {
    dot_tokens<2>(ws, xs, nt, k, out);
  } else {
    dot_tokens<1>(ws, xs, nt, k, out);
  }
}

}  // namespace mixexport
