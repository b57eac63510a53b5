// Window attention forward: o = softmax(S) v and lse, S as in window_attention.cuh.
//
// One block per (window b, head h, tile of kBlockQ query rows). For its rows it writes the whole
// score row block S[rows, 0:N_k] into shared memory (N_k <= 256, so it fits: no online rescaling is
// needed), takes the exact row max and sum there, and multiplies by v one key tile at a time:
//
//     S_s[i, j] = scale q_i . k_j + bias[h, i, j] + mask[b % nW, i, j]      key tile by key tile
//     m_i = max_j S_s[i, j]      P_s[i, j] = exp(S_s[i, j] - m_i)      l_i = sum_j P_s[i, j]
//     lse_i = m_i + log l_i      o_i = (sum_j P_s[i, j] v_j) / l_i
//
// q, k, v are read from global memory once per block (k and v once per query tile of the window,
// the repeats served from L2); S and P stay on chip. fp32 throughout; o is rounded once.
// This is the kernel for fp32 inputs and GPUs before sm_80; fp16 and bf16 on sm_80 and later run
// window_attention_tc_kernel.cuh's tensor-core version.

#pragma once

#include <cstdint>

#include "window_attention.cuh"

namespace adaptsr {
namespace window_attention {

constexpr int kBlockQ = 16;   // query rows per block: S_s is kBlockQ x 256 fp32 = 16 KB
constexpr int kBlockK = 64;   // key rows per staged k / v tile
constexpr int kOutPerThread = kBlockQ * kMaxHeadDim / kThreads;
static_assert(kBlockQ * kMaxHeadDim % kThreads == 0, "output entries must split evenly over the threads");
static_assert(kBlockQ % kWarps == 0, "softmax rows must split evenly over the warps");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, const float* __restrict__ bias,
                                const float* __restrict__ mask, scalar_t* __restrict__ out, float* __restrict__ lse,
                                int heads, int n, int n_keys, int d, int num_masks, float scale) {
  __shared__ float q_s[kBlockQ][kRowPad];
  __shared__ float kv_s[kBlockK][kRowPad];
  __shared__ float s_s[kBlockQ][kMaxSeq];
  __shared__ float inv_l_s[kBlockQ];

  const int b = blockIdx.x, h = blockIdx.y, q0 = blockIdx.z * kBlockQ;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t bh = static_cast<int64_t>(b) * heads + h;
  const int64_t base = bh * n * d;         // first element of this window and head in q and out
  const int64_t kv_base = bh * n_keys * d;  // ... in k and v
  const int64_t plane = static_cast<int64_t>(n) * n_keys;
  const float* bias_h = bias != nullptr ? bias + h * plane : nullptr;
  const float* mask_w = mask != nullptr ? mask + (b % num_masks) * plane : nullptr;

  // -- load the query tile --
  load_rows(q_s, q + base, q0, kBlockQ, n, d);

  // -- scores S_s[i, j] for every key, one k tile at a time --
  for (int k0 = 0; k0 < n_keys; k0 += kBlockK) {
    __syncthreads();  // q_s is loaded; the previous k tile's readers are done
    load_rows(kv_s, k + kv_base, k0, kBlockK, n_keys, d);
    __syncthreads();
    for (int e = tid; e < kBlockQ * kBlockK; e += kThreads) {
      const int i = e / kBlockK, j = e % kBlockK;  // consecutive threads: consecutive keys
      const int row = q0 + i, key = k0 + j;
      if (key < n_keys) {
        const float qk = dot_row(q_s[i], kv_s[j], d);
        // Rows past n hold zeros in q_s; they get finite scores and are never written out.
        s_s[i][key] = row < n ? score(qk, scale, bias_h, mask_w, row, key, n_keys) : 0.f;
      }
    }
  }
  __syncthreads();

  // -- exact row softmax in shared memory: one warp per row --
  for (int i = warp; i < kBlockQ; i += kWarps) {
    float m = -INFINITY;
    for (int j = lane; j < n_keys; j += kWarpSize) m = fmaxf(m, s_s[i][j]);
    m = warp_max(m);
    const float m_safe = m == -INFINITY ? 0.f : m;  // a fully masked row: P = 0, not NaN
    float l = 0.f;
    for (int j = lane; j < n_keys; j += kWarpSize) {
      const float p = expf(s_s[i][j] - m_safe);
      s_s[i][j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      inv_l_s[i] = l > 0.f ? 1.f / l : 0.f;
      if (q0 + i < n) lse[bh * n + q0 + i] = l > 0.f ? m_safe + logf(l) : -INFINITY;
    }
  }

  // -- o = P v / l, one v tile at a time; thread owns entries (i, c) = e / kMaxHeadDim, e % kMaxHeadDim --
  float acc[kOutPerThread];
#pragma unroll
  for (int a = 0; a < kOutPerThread; ++a) acc[a] = 0.f;
  for (int k0 = 0; k0 < n_keys; k0 += kBlockK) {
    __syncthreads();  // P is final; the previous v tile's readers are done
    load_rows(kv_s, v + kv_base, k0, kBlockK, n_keys, d);
    __syncthreads();
    const int keys = min(kBlockK, n_keys - k0);
#pragma unroll
    for (int a = 0; a < kOutPerThread; ++a) {
      const int e = tid + a * kThreads;
      const int i = e / kMaxHeadDim, c = e % kMaxHeadDim;
      if (c < d) {
        float sum = 0.f;
        for (int j = 0; j < keys; ++j) sum += s_s[i][k0 + j] * kv_s[j][c];
        acc[a] += sum;
      }
    }
  }

  // -- write o (consecutive threads: consecutive columns of one row) --
#pragma unroll
  for (int a = 0; a < kOutPerThread; ++a) {
    const int e = tid + a * kThreads;
    const int i = e / kMaxHeadDim, c = e % kMaxHeadDim;
    if (c < d && q0 + i < n) out[base + static_cast<int64_t>(q0 + i) * d + c] = from_float<scalar_t>(acc[a] * inv_l_s[i]);
  }
}

}  // namespace window_attention
}  // namespace adaptsr
