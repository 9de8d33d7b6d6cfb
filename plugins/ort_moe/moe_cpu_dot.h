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

// The many-token path (a prefill's expert): tokens side by side. `xt` is a group of kTokenGroup
// token rows transposed, kc columns of them (xt[k * kTokenGroup + l] is token l at column k; zero
// past the group's tokens); for nr weight rows ws[i][0..kc), row-major as the graph stores them:
// c[i * ldc + l] += sum_k ws[i][k] * xt[k * kTokenGroup + l] for l < kTokenGroup.
// Each weight is broadcast from its row to the whole group: the weights need no packing (they are
// read where they lie, once a group) and the kernel has no horizontal sums.
constexpr int64_t kTokenGroup = 32;
void gemm_rows(const float* const* ws, size_t nr, const float* xt, int64_t kc, float* c, int64_t ldc);

}  // namespace mixexport
