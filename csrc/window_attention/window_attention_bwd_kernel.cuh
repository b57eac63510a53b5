// Window attention backward, flash-attention style: P is recomputed from the saved lse, never
// read from or written to global memory.
//
// With dO = dL/do, per window b and head h (S, P as in window_attention.cuh):
//
//     delta_i  = sum_c dO[i, c] o[i, c]                      (= sum_j P[i, j] dP[i, j])
//     dP[i, j] = dO_i . v_j
//     dS[i, j] = P[i, j] (dP[i, j] - delta_i)
//     dq_i     = scale sum_j dS[i, j] k_j
//     dk_j     = scale sum_i dS[i, j] q_i
//     dv_j     = sum_i P[i, j] dO_i
//     dbias[h, i, j] = sum_b dS_b[i, j]                      (S is linear in the bias)
//
// Three kernels, none with atomics, so every result is deterministic:
//   1. delta: one warp per row.
//   2. dq and dbias: one block per (window split, head, query tile); it loops over the windows of
//      its split in a fixed order, keeps its [tile x N_k] share of dbias in shared memory across
//      them, and writes one partial per split; a fixed-order sum over splits gives dbias.
//   3. dk and dv: one block per (window, head, key tile), looping over the query tiles.
// dq and dk, dv come from separate kernels (the score tile is recomputed in each) so that every
// output row has exactly one writer.
// Kernels 2 and 3 here are for fp32 inputs and GPUs before sm_80; fp16 and bf16 on sm_80 and
// later run window_attention_tc_kernel.cuh's tensor-core versions (kernel 1 is shared).

#pragma once

#include <cstdint>

#include "window_attention.cuh"

namespace adaptsr {
namespace window_attention {

// -- kernel 1: delta --

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                           float* __restrict__ delta, int64_t rows, int d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together: the shuffle below sees full warps
  float acc = 0.f;
  for (int c = lane; c < d; c += kWarpSize) acc += to_float(grad_out[row * d + c]) * to_float(out[row * d + c]);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

// -- kernel 2: dq and the per-split dbias partials --

constexpr int kDqBlockQ = 8;   // query rows per block: ds_s and dbias_s are 8 x 256 fp32 = 8 KB each
constexpr int kDqBlockK = 64;  // key rows per staged k / v tile
constexpr int kDqScoresPerThread = kDqBlockQ * kDqBlockK / kThreads;
constexpr int kDqOutPerThread = kDqBlockQ * kMaxHeadDim / kThreads;
static_assert(kDqBlockQ * kDqBlockK % kThreads == 0 && kDqBlockQ * kMaxHeadDim % kThreads == 0,
              "tiles must split evenly over the threads");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_dq_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                               const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const float* __restrict__ bias, const float* __restrict__ mask,
                               scalar_t* __restrict__ grad_q, float* __restrict__ dbias_parts, int64_t windows,
                               int heads, int n, int n_keys, int d, int num_masks, float scale) {
  __shared__ float q_s[kDqBlockQ][kRowPad];
  __shared__ float do_s[kDqBlockQ][kRowPad];
  __shared__ float kv_s[kDqBlockK][kRowPad];
  __shared__ float ds_s[kDqBlockQ][kMaxSeq];
  // dS of the block's rows summed over the split's windows; entry (i, j) is only ever touched by
  // the thread that computes dS[i, j] (the same thread for every window): no races, fixed order.
  __shared__ float dbias_s[kDqBlockQ][kMaxSeq];
  __shared__ float lse_s[kDqBlockQ];
  __shared__ float delta_s[kDqBlockQ];

  const int split = blockIdx.x, num_splits = gridDim.x, h = blockIdx.y, q0 = blockIdx.z * kDqBlockQ;
  const int tid = threadIdx.x;
  const bool want_dbias = dbias_parts != nullptr;
  // (the [N, N_k] plane's size is recomputed where it is used: held across the window loop, it cost a stack slot)
  const float* bias_h = bias != nullptr ? bias + static_cast<int64_t>(h) * n * n_keys : nullptr;

  for (int e = tid; e < kDqBlockQ * kMaxSeq; e += kThreads) dbias_s[e / kMaxSeq][e % kMaxSeq] = 0.f;

  for (int64_t b = split; b < windows; b += num_splits) {
    const int64_t bh = b * heads + h;
    const int64_t base = bh * n * d, kv_base = bh * n_keys * d;
    const float* mask_w = mask != nullptr ? mask + (b % num_masks) * n * n_keys : nullptr;

    __syncthreads();  // the previous window's readers of every tile are done
    load_rows(q_s, q + base, q0, kDqBlockQ, n, d);
    load_rows(do_s, grad_out + base, q0, kDqBlockQ, n, d);
    for (int i = tid; i < kDqBlockQ; i += kThreads) {
      const bool ok = q0 + i < n;
      lse_s[i] = ok ? lse[bh * n + q0 + i] : 0.f;
      delta_s[i] = ok ? delta[bh * n + q0 + i] : 0.f;
    }

    // -- dS[i, j] for every key: P from q, k and lse; dP from dO and v --
    for (int k0 = 0; k0 < n_keys; k0 += kDqBlockK) {
      __syncthreads();  // q_s, do_s, lse_s, delta_s loaded; the previous tile's readers are done
      load_rows(kv_s, k + kv_base, k0, kDqBlockK, n_keys, d);
      __syncthreads();
      float p[kDqScoresPerThread];
#pragma unroll
      for (int a = 0; a < kDqScoresPerThread; ++a) {
        const int e = tid + a * kThreads;
        const int i = e / kDqBlockK, j = e % kDqBlockK;  // consecutive threads: consecutive keys
        const int row = q0 + i, key = k0 + j;
        p[a] = 0.f;
        if (row < n && key < n_keys) {
          const float s = score(dot_row(q_s[i], kv_s[j], d), scale, bias_h, mask_w, row, key, n_keys);
          p[a] = prob(s, lse_s[i]);
        }
      }
      __syncthreads();
      load_rows(kv_s, v + kv_base, k0, kDqBlockK, n_keys, d);
      __syncthreads();
#pragma unroll
      for (int a = 0; a < kDqScoresPerThread; ++a) {
        const int e = tid + a * kThreads;
        const int i = e / kDqBlockK, j = e % kDqBlockK;
        const int row = q0 + i, key = k0 + j;
        if (key < n_keys) {
          const float ds = row < n ? p[a] * (dot_row(do_s[i], kv_s[j], d) - delta_s[i]) : 0.f;
          ds_s[i][key] = ds;
          if (want_dbias) dbias_s[i][key] += ds;
        }
      }
    }

    // -- dq_i = scale sum_j dS[i, j] k_j; thread owns entries (i, c) = e / kMaxHeadDim, e % kMaxHeadDim --
    float acc[kDqOutPerThread];
#pragma unroll
    for (int a = 0; a < kDqOutPerThread; ++a) acc[a] = 0.f;
    for (int k0 = 0; k0 < n_keys; k0 += kDqBlockK) {
      __syncthreads();  // ds_s is complete; the previous tile's readers are done
      load_rows(kv_s, k + kv_base, k0, kDqBlockK, n_keys, d);
      __syncthreads();
      const int keys = min(kDqBlockK, n_keys - k0);
#pragma unroll
      for (int a = 0; a < kDqOutPerThread; ++a) {
        const int e = tid + a * kThreads;
        const int i = e / kMaxHeadDim, c = e % kMaxHeadDim;
        if (c < d) {
          float sum = 0.f;
          for (int j = 0; j < keys; ++j) sum += ds_s[i][k0 + j] * kv_s[j][c];
          acc[a] += sum;
        }
      }
    }
#pragma unroll
    for (int a = 0; a < kDqOutPerThread; ++a) {
      const int e = tid + a * kThreads;
      const int i = e / kMaxHeadDim, c = e % kMaxHeadDim;
      if (c < d && q0 + i < n) grad_q[base + static_cast<int64_t>(q0 + i) * d + c] = from_float<scalar_t>(scale * acc[a]);
    }
  }

  // -- this split's dbias partial: dbias_parts[split][h][i][j], one writer per entry --
  if (want_dbias) {
    __syncthreads();
    float* part = dbias_parts + (static_cast<int64_t>(split) * heads + h) * n * n_keys;
    for (int e = tid; e < kDqBlockQ * n_keys; e += kThreads) {
      const int i = e / n_keys, key = e % n_keys;
      if (q0 + i < n) part[static_cast<int64_t>(q0 + i) * n_keys + key] = dbias_s[i][key];
    }
  }
}

// -- kernel 3: dk and dv --

constexpr int kKvBlockK = 16;  // key rows per block
constexpr int kKvBlockQ = 32;  // query rows per staged q / dO tile
constexpr int kKvScoresPerThread = kKvBlockK * kKvBlockQ / kThreads;
constexpr int kKvOutPerThread = kKvBlockK * kMaxHeadDim / kThreads;
static_assert(kKvBlockK * kKvBlockQ % kThreads == 0 && kKvBlockK * kMaxHeadDim % kThreads == 0,
              "tiles must split evenly over the threads");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_dkdv_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                 const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 const float* __restrict__ bias, const float* __restrict__ mask,
                                 scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, int heads, int n,
                                 int n_keys, int d, int num_masks, float scale) {
  __shared__ float k_s[kKvBlockK][kRowPad];
  __shared__ float v_s[kKvBlockK][kRowPad];
  __shared__ float q_s[kKvBlockQ][kRowPad];
  __shared__ float do_s[kKvBlockQ][kRowPad];
  __shared__ float p_s[kKvBlockK][kKvBlockQ + 1];
  __shared__ float ds_s[kKvBlockK][kKvBlockQ + 1];
  __shared__ float lse_s[kKvBlockQ];
  __shared__ float delta_s[kKvBlockQ];

  const int b = blockIdx.x, h = blockIdx.y, k0 = blockIdx.z * kKvBlockK;
  const int tid = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * heads + h;
  const int64_t base = bh * n * d, kv_base = bh * n_keys * d;
  const int64_t plane = static_cast<int64_t>(n) * n_keys;
  const float* bias_h = bias != nullptr ? bias + h * plane : nullptr;
  const float* mask_w = mask != nullptr ? mask + (b % num_masks) * plane : nullptr;

  load_rows(k_s, k + kv_base, k0, kKvBlockK, n_keys, d);
  load_rows(v_s, v + kv_base, k0, kKvBlockK, n_keys, d);

  // Thread owns entries (j, c) = e / kMaxHeadDim, e % kMaxHeadDim of dk and dv.
  float dk_acc[kKvOutPerThread], dv_acc[kKvOutPerThread];
#pragma unroll
  for (int a = 0; a < kKvOutPerThread; ++a) dk_acc[a] = dv_acc[a] = 0.f;

  for (int q0 = 0; q0 < n; q0 += kKvBlockQ) {
    __syncthreads();  // k_s, v_s loaded; the previous query tile's readers are done
    load_rows(q_s, q + base, q0, kKvBlockQ, n, d);
    load_rows(do_s, grad_out + base, q0, kKvBlockQ, n, d);
    for (int i = tid; i < kKvBlockQ; i += kThreads) {
      const bool ok = q0 + i < n;
      lse_s[i] = ok ? lse[bh * n + q0 + i] : 0.f;
      delta_s[i] = ok ? delta[bh * n + q0 + i] : 0.f;
    }
    __syncthreads();

    // -- P and dS of this (key tile, query tile) pair, transposed: p_s[j][i] --
#pragma unroll
    for (int a = 0; a < kKvScoresPerThread; ++a) {
      const int e = tid + a * kThreads;
      const int j = e % kKvBlockK, i = e / kKvBlockK;  // consecutive threads: consecutive keys (bias rows)
      const int row = q0 + i, key = k0 + j;
      float p = 0.f, ds = 0.f;
      if (row < n && key < n_keys) {
        const float s = score(dot_row(q_s[i], k_s[j], d), scale, bias_h, mask_w, row, key, n_keys);
        p = prob(s, lse_s[i]);
        ds = p * (dot_row(do_s[i], v_s[j], d) - delta_s[i]);
      }
      p_s[j][i] = p;
      ds_s[j][i] = ds;
    }
    __syncthreads();

    // -- dv_j += sum_i P[i, j] dO_i,  dk_j += sum_i dS[i, j] q_i --
    const int rows = min(kKvBlockQ, n - q0);
#pragma unroll
    for (int a = 0; a < kKvOutPerThread; ++a) {
      const int e = tid + a * kThreads;
      const int j = e / kMaxHeadDim, c = e % kMaxHeadDim;
      if (c < d) {
        float sum_v = 0.f, sum_k = 0.f;
        for (int i = 0; i < rows; ++i) {
          sum_v += p_s[j][i] * do_s[i][c];
          sum_k += ds_s[j][i] * q_s[i][c];
        }
        dv_acc[a] += sum_v;
        dk_acc[a] += sum_k;
      }
    }
  }

#pragma unroll
  for (int a = 0; a < kKvOutPerThread; ++a) {
    const int e = tid + a * kThreads;
    const int j = e / kMaxHeadDim, c = e % kMaxHeadDim;
    if (c < d && k0 + j < n_keys) {
      const int64_t at = kv_base + static_cast<int64_t>(k0 + j) * d + c;
      grad_k[at] = from_float<scalar_t>(scale * dk_acc[a]);
      grad_v[at] = from_float<scalar_t>(dv_acc[a]);
    }
  }
}

}  // namespace window_attention
}  // namespace adaptsr
