// Dot products of weight rows with activation rows, the MoE op's inner loop.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mixexport {

// Tokens that share one pass over a weight row: the row is read once for all of them.
constexpr size_t kTokensPerPass = 4;

// out[q] = sum_k w[k] * xs[q][k] for q < nt (1..kTokensPerPass), float32 accumulation. One weight
// row a call, so the rows a caller walks in order are one sequential stream: on the 2-core EPYC
// this was measured on, reading two rows side by side (gate row i beside up row i) streamed at
// about half the bandwidth of reading them one after the other.
void dot_tokens(const float* w, const float* const* xs, size_t nt, int64_t k, float* out);

// The many-token path (a prefill's expert): C += X P over a packed panel of `tiles` tiles, each
// kc x kPanelTile (tile-major: p[(tile * kc + k) * kPanelTile + l] is weight row tile * kPanelTile
// + l at column k), for nt <= kGemmTokens token rows xs[t][0..kc):
// c[t * ldc + tile * kPanelTile + l] += sum_k xs[t][k] * p[(tile * kc + k) * kPanelTile + l].
// Broadcast-multiply-add, no horizontal sums: as many multiply-adds per load as the registers allow.
constexpr size_t kGemmTokens = 6;
constexpr int64_t kPanelTile = 16;
void gemm_panel(const float* p, int64_t kc, int64_t tiles, const float* const* xs, size_t nt, float* c, int64_t ldc);

}  // namespace mixexport
