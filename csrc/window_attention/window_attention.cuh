// What the window-attention forward and backward kernels share: sizes, the tile loader and the
// score formula (device code; the host-side checks are in window_attention_checks.h).
//
// Per window b (of B_) and head h, with q: [N, d] and k, v: [N_k, d] rows of that window and head
// (N_k = N in Swin's windows; HAT's overlapping cross-attention has more keys than queries):
//
//     S[i, j] = scale * q_i . k_j + bias[h, i, j] + mask[b % nW, i, j]     (bias, mask optional: [N, N_k] planes)
//     P       = softmax_j(S)          lse[i] = log sum_j exp S[i, j]
//     o       = P v
//
// N <= kMaxSeq (Swin windows: 64 or 256 tokens) and d <= kMaxHeadDim; N_k <= kMaxSeq where a kernel
// keeps whole score rows in shared memory (the CUDA-core kernels, and the dbias sum), any N_k on the
// tensor-core path otherwise. Neither S nor P ever reaches global memory.
#pragma once

#include <cstdint>

#include "../common.cuh"
#include "window_attention_limits.h"

namespace adaptsr {
namespace window_attention {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowPad = kMaxHeadDim + 1;  // row stride of [rows][d] tiles: a column walk hits 32 banks

// tile[r][c] = src[(row0 + r) * d + c] in fp32 for r < rows, c < d; zero rows past n.
template <typename scalar_t>
__device__ __forceinline__ void load_rows(float (*tile)[kRowPad], const scalar_t* __restrict__ src, int row0,
                                          int rows, int n, int d) {
  // The rows of one window and head are contiguous: consecutive threads read consecutive elements.
  for (int i = threadIdx.x; i < rows * d; i += kThreads) {
    const int r = i / d, c = i % d;
    tile[r][c] = row0 + r < n ? to_float(src[static_cast<int64_t>(row0 + r) * d + c]) : 0.f;
  }
}

// sum_c a[c] * b[c] over the head dimension, in increasing c (the forward and the backward
// recompute the same scores in the same order).
__device__ __forceinline__ float dot_row(const float* a, const float* b, int d) {
  float acc = 0.f;
  for (int c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

// S[i, j] from the dot product q_i . k_j; bias_h and mask_w point at [N, N_k] planes or are null.
__device__ __forceinline__ float score(float qk, float scale, const float* __restrict__ bias_h,
                                       const float* __restrict__ mask_w, int i, int j, int n_keys) {
  float s = qk * scale;
  const int64_t at = static_cast<int64_t>(i) * n_keys + j;
  if (bias_h != nullptr) s += bias_h[at];
  if (mask_w != nullptr) s += mask_w[at];
  return s;
}

// P[i, j] = exp(S[i, j] - lse[i]); a row whose every score is -inf has lse = -inf and P = 0.
__device__ __forceinline__ float prob(float s, float lse) { return lse == -INFINITY ? 0.f : expf(s - lse); }

// P[i, j] and dS[i, j] = P[i, j] (dP[i, j] - delta_i) from the entry's q_i . k_j and dO_i . v_j; both 0
// outside the window (row past n or key past n_keys).
struct ProbAndGrad {
  float p, ds;
};
__device__ __forceinline__ ProbAndGrad prob_and_grad(float qk, float dov, float scale, const float* __restrict__ bias_h,
                                                     const float* __restrict__ mask_w, int i, int j, int n,
                                                     int n_keys, float lse_i, float delta_i) {
  if (i >= n || j >= n_keys) return {0.f, 0.f};
  const float p = prob(score(qk, scale, bias_h, mask_w, i, j, n_keys), lse_i);
  return {p, p * (dov - delta_i)};
}

}  // namespace window_attention
}  // namespace adaptsr
