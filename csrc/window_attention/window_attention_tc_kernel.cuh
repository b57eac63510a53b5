// Tensor-core versions of the window-attention kernels (window_attention_fwd_kernel.cuh and
// window_attention_bwd_kernel.cuh have the math) for fp16 and bf16 inputs on sm_80 and later.
//
// The CUDA-core kernels do every product of the head dimension as fp32 FMAs from shared memory:
// about 3 GFLOP per SwinIR-M block forward, several times the bytes' floor. Here each product is
// a sum of 16 x 16 x 16 WMMA tiles with fp32 accumulators, the head dimension padded with zeros
// to whole 16-wide steps inside the kernel (SwinIR's 30 -> 32):
//
//     forward   S  = q k^T            o  += P v                 (P rounded to 16 bits, as torch's)
//     dq        S  = q k^T, dP = dO v^T                dq += dS k
//     dk, dv    S^T = k q^T, dP^T = v dO^T             dv += P^T dO,  dk += dS^T q
//
// WMMA fragments hide which lane holds which entry, so the elementwise steps (bias, mask, the
// softmax, dS) go through a warp's own [16 x 16|32] fp32 strip in shared memory: the warp stores
// its fragment, its lanes work on the strip, two lanes per row, each taking every other column
// (the lanes of a row read neighbouring bias and mask entries), and load the 16-bit result back.
// Every warp owns 16 rows (queries in the forward and dq, keys in dk/dv), so inside the main
// loops the warps meet only where they share a staged tile; __syncwarp orders the rest.
//
// The forward runs an online softmax over 32-key tiles (o rescaled in the warp's strip by
// exp(m_old - m_new) before each P v product): no [rows x N] score block, which at N = 256 and
// 64 rows would not fit in shared memory. The backward needs no rescaling: P comes from lse.

#pragma once

#include <type_traits>

#include "../tensor_core.cuh"
#include "window_attention.cuh"
#include "window_attention_bwd_kernel.cuh"
#include "window_attention_fwd_kernel.cuh"

namespace adaptsr {
namespace window_attention {

constexpr int kMaxHeadSteps = kMaxHeadDim / kMma;  // 16-wide steps of the padded head dimension
// Row pitches of the shared tiles (elements): load_matrix_sync and store_matrix_sync want rows of
// a multiple of 16 bytes at 32-byte aligned fragments; the extra 8 (16-bit) or 4 (fp32) columns
// also spread the rows over the shared-memory banks.
constexpr int kHeadPitch = kMaxHeadDim + 8;     // 16-bit [rows][head dim] tiles
constexpr int kHeadPitchF32 = kMaxHeadDim + 4;  // fp32 [16][head dim] strips
// Static shared memory of a block: 48 KB at most (more needs dynamic shared memory and an opt-in).
constexpr int kMaxStaticShared = 48 * 1024;

__device__ __forceinline__ int head_steps(int d) { return (d + kMma - 1) / kMma; }

// tile[r][c] = src[(row0 + r) * d + c] for r < rows over the padded head dimension, zero past row
// n or column d. The threads first, first + stride, ... share it (a block: threadIdx.x and
// kThreads; a warp: its lane and kWarpSize); consecutive threads read consecutive elements.
template <typename scalar_t>
__device__ __forceinline__ void load_head_tile(scalar_t (*tile)[kHeadPitch], const scalar_t* __restrict__ src,
                                               int row0, int rows, int n, int d, int first, int stride) {
  const int width = head_steps(d) * kMma;
  for (int e = first; e < rows * width; e += stride) {
    const int r = e / width, c = e % width;
    const bool inside = row0 + r < n && c < d;
    tile[r][c] = inside ? src[static_cast<int64_t>(row0 + r) * d + c] : from_float<scalar_t>(0.f);
  }
}

// dst[(row0 + r) * d + c] = scale * row_scale[r] * strip[r][c] for the rows below n of a warp's
// 16-row strip (row_scale may be null): the rows are one contiguous run of dst, written by
// consecutive lanes at consecutive addresses.
template <typename scalar_t>
__device__ __forceinline__ void store_head_strip(scalar_t* __restrict__ dst, const float (*strip)[kHeadPitchF32],
                                                 const float* row_scale, float scale, int row0, int n, int d,
                                                 int lane) {
  for (int e = lane; e < kMma * d; e += kWarpSize) {
    const int r = e / d, c = e % d;
    if (row0 + r >= n) break;  // rows only grow with e
    const float factor = row_scale != nullptr ? scale * row_scale[r] : scale;
    dst[static_cast<int64_t>(row0 + r) * d + c] = from_float<scalar_t>(factor * strip[r][c]);
  }
}

template <typename scalar_t>
using HeadFragA =
    wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, typename TensorCoreTile<scalar_t>::element, wmma::row_major>;
template <typename scalar_t, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, typename TensorCoreTile<scalar_t>::element, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float>;

// acc = a_rows (16 x head dim) . b_rows^T, b_rows a [16][head dim] tile: the rows' dot products
// over the head dimension (a tile read column-major is its transpose).
template <typename scalar_t>
__device__ __forceinline__ void rows_dot_rows(FragAcc& acc, const scalar_t (*a_rows)[kHeadPitch],
                                              const scalar_t (*b_rows)[kHeadPitch], int steps) {
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s) {
    if (s < steps) {
      HeadFragA<scalar_t> a;
      FragB<scalar_t, wmma::col_major> bt;
      wmma::load_matrix_sync(a, as_tensor_core(&a_rows[0][s * kMma]), kHeadPitch);
      wmma::load_matrix_sync(bt, as_tensor_core(&b_rows[0][s * kMma]), kHeadPitch);
      wmma::mma_sync(acc, a, bt, acc);
    }
  }
}

// acc[s] += weights (16 x 16, 16-bit, row pitch `pitch`) . rows (16 x head dim) for every head step.
template <typename scalar_t>
__device__ __forceinline__ void accumulate_weighted_rows(FragAcc (&acc)[kMaxHeadSteps], const scalar_t* weights,
                                                         int pitch, const scalar_t (*rows)[kHeadPitch], int steps) {
  HeadFragA<scalar_t> w;
  wmma::load_matrix_sync(w, as_tensor_core(weights), pitch);
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s) {
    if (s < steps) {
      FragB<scalar_t, wmma::row_major> b;
      wmma::load_matrix_sync(b, as_tensor_core(&rows[0][s * kMma]), kHeadPitch);
      wmma::mma_sync(acc[s], w, b, acc[s]);
    }
  }
}

// A warp's fp32 [16][kCols] strip of scores, or the same bytes as a 16-bit strip twice as wide
// (written only after the fp32 values have been read).
template <typename scalar_t, int kCols>
union ScoreStrip {
  static constexpr int kPitch = kCols + 4;  // fp32 elements per row
  static constexpr int kPitch16 = 2 * kPitch;
  __align__(32) float f32[kMma][kPitch];
  __align__(32) scalar_t b16[kMma][kPitch16];
};

// A warp's 16 key rows of k and v, or, once they are read, its fp32 [16][head dim] result strip.
template <typename scalar_t>
union WarpRows {
  struct {
    __align__(32) scalar_t k[kMma][kHeadPitch];
    __align__(32) scalar_t v[kMma][kHeadPitch];
  } kv;
  __align__(32) float out[kMma][kHeadPitchF32];
};

// ---------------------------------------------------------------------------------------------
// forward: one block per (window, head, 64 query rows); warp w owns rows 16 w .. 16 w + 15
// ---------------------------------------------------------------------------------------------

constexpr int kTcFwdBlockQ = kWarps * kMma;
constexpr int kTcFwdBlockK = 2 * kMma;  // keys per staged k / v tile
constexpr int kTcFwdKeysPerLane = kTcFwdBlockK / 2;

template <typename scalar_t>
struct FwdTcSmem {
  __align__(32) scalar_t k[kTcFwdBlockK][kHeadPitch];
  __align__(32) scalar_t v[kTcFwdBlockK][kHeadPitch];
  ScoreStrip<scalar_t, kTcFwdBlockK> scores[kWarps];  // S in fp32, then P in 16 bits
  float inv_l[kWarps][kMma];
  union {
    __align__(32) scalar_t q[kTcFwdBlockQ][kHeadPitch];  // staged once, into the warps' fragments
    __align__(32) float o[kWarps][kMma][kHeadPitchF32];  // then each warp's running (unnormalised) o
  };
};
static_assert(sizeof(FwdTcSmem<c10::BFloat16>) <= kMaxStaticShared, "FwdTcSmem must fit in static shared memory");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_fwd_tc_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                   const scalar_t* __restrict__ v, const float* __restrict__ bias,
                                   const float* __restrict__ mask, scalar_t* __restrict__ out,
                                   float* __restrict__ lse, int heads, int n, int n_keys, int d, int num_masks,
                                   float scale) {
#if ADAPTSR_TENSOR_CORES
  __shared__ FwdTcSmem<scalar_t> sm;
  const int b = blockIdx.x, h = blockIdx.y, q0 = blockIdx.z * kTcFwdBlockQ;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int steps = head_steps(d);
  const int64_t bh = static_cast<int64_t>(b) * heads + h;
  const int64_t base = bh * n * d, kv_base = bh * n_keys * d;
  const int64_t plane = static_cast<int64_t>(n) * n_keys;
  const float* bias_h = bias != nullptr ? bias + h * plane : nullptr;
  const float* mask_w = mask != nullptr ? mask + (b % num_masks) * plane : nullptr;
  const int rows0 = q0 + warp * kMma;  // the warp's first query row

  // -- the warp's q rows as fragments, kept for the whole key loop --
  load_head_tile(sm.q, q + base, q0, kTcFwdBlockQ, n, d, tid, kThreads);
  __syncthreads();
  HeadFragA<scalar_t> q_frag[kMaxHeadSteps];
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s)
    if (s < steps) wmma::load_matrix_sync(q_frag[s], as_tensor_core(&sm.q[warp * kMma][s * kMma]), kHeadPitch);
  __syncthreads();  // every warp holds its q before o, in the same bytes, is cleared
  float (*o_strip)[kHeadPitchF32] = sm.o[warp];
  for (int e = lane; e < kMma * kHeadPitchF32; e += kWarpSize) o_strip[e / kHeadPitchF32][e % kHeadPitchF32] = 0.f;

  // Lanes 2r and 2r + 1 keep the softmax state of the warp's row r.
  const int r = lane / 2, half = lane % 2, row = rows0 + r;
  float m = -INFINITY, l = 0.f;
  FragAcc o_frag[kMaxHeadSteps];
  for (int k0 = 0; k0 < n_keys; k0 += kTcFwdBlockK) {
    __syncthreads();  // the previous tile's k and v readers are done
    load_head_tile(sm.k, k + kv_base, k0, kTcFwdBlockK, n_keys, d, tid, kThreads);
    load_head_tile(sm.v, v + kv_base, k0, kTcFwdBlockK, n_keys, d, tid, kThreads);
    __syncthreads();

    // -- S = q k^T: the warp's 16 rows x the tile's 32 keys --
    using Strip = ScoreStrip<scalar_t, kTcFwdBlockK>;
    float (*s_strip)[Strip::kPitch] = sm.scores[warp].f32;
#pragma unroll
    for (int f = 0; f < kTcFwdBlockK / kMma; ++f) {
      FragAcc s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int s = 0; s < kMaxHeadSteps; ++s) {
        if (s < steps) {
          FragB<scalar_t, wmma::col_major> kt;
          wmma::load_matrix_sync(kt, as_tensor_core(&sm.k[f * kMma][s * kMma]), kHeadPitch);
          wmma::mma_sync(s_frag, q_frag[s], kt, s_frag);
        }
      }
      wmma::store_matrix_sync(&s_strip[0][f * kMma], s_frag, Strip::kPitch, wmma::mem_row_major);
    }
    __syncwarp();

    // -- online softmax of row r: the tile's scores, the new max, P in 16 bits, l and o rescaled --
    float s_row[kTcFwdKeysPerLane];
    float tile_max = -INFINITY;
#pragma unroll
    for (int t = 0; t < kTcFwdKeysPerLane; ++t) {
      const int key = k0 + half + 2 * t;
      float s = -INFINITY;  // keys past n_keys get P = 0; rows past n finite scores (never written out)
      if (key < n_keys) s = row < n ? score(s_strip[r][half + 2 * t], scale, bias_h, mask_w, row, key, n_keys) : 0.f;
      s_row[t] = s;
      tile_max = fmaxf(tile_max, s);
    }
    const float m_new = fmaxf(m, fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1)));
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far: P = 0, not NaN
    const float alpha = expf(m - m_safe);                   // 0 while m is -inf
    __syncwarp();  // every lane has read its scores before P overwrites them
    float tile_sum = 0.f;
#pragma unroll
    for (int t = 0; t < kTcFwdKeysPerLane; ++t) {
      const float p = expf(s_row[t] - m_safe);
      sm.scores[warp].b16[r][half + 2 * t] = from_float<scalar_t>(p);
      tile_sum += p;
    }
    l = alpha * l + (tile_sum + __shfl_xor_sync(0xffffffffu, tile_sum, 1));
    m = m_new;
    for (int c = half; c < steps * kMma; c += 2) o_strip[r][c] *= alpha;
    __syncwarp();

    // -- o += P v over the tile's keys, accumulated through the warp's strip --
#pragma unroll
    for (int s = 0; s < kMaxHeadSteps; ++s)
      if (s < steps) wmma::load_matrix_sync(o_frag[s], &o_strip[0][s * kMma], kHeadPitchF32, wmma::mem_row_major);
    __syncwarp();  // every lane holds o before any stores it back (the emulation runs lanes in turn)
#pragma unroll
    for (int f = 0; f < kTcFwdBlockK / kMma; ++f)
      accumulate_weighted_rows(o_frag, &sm.scores[warp].b16[0][f * kMma], Strip::kPitch16, &sm.v[f * kMma], steps);
#pragma unroll
    for (int s = 0; s < kMaxHeadSteps; ++s)
      if (s < steps) wmma::store_matrix_sync(&o_strip[0][s * kMma], o_frag[s], kHeadPitchF32, wmma::mem_row_major);
  }

  // -- lse, and o / l written as one contiguous run of the warp's rows --
  if (half == 0) {
    sm.inv_l[warp][r] = l > 0.f ? 1.f / l : 0.f;
    if (row < n) lse[bh * n + row] = l > 0.f ? m + logf(l) : -INFINITY;
  }
  __syncwarp();
  store_head_strip(out + base, o_strip, sm.inv_l[warp], 1.f, rows0, n, d, lane);
#endif
}

// ---------------------------------------------------------------------------------------------
// dq and the dbias partials: one block per (window split, head, 16 query rows); the warps take
// the keys 16 at a time (warp w: key tiles w, w + 4, ...) and their dq partials are summed in
// warp order at the end of each window
// ---------------------------------------------------------------------------------------------

constexpr int kTcDqBlockQ = kMma;
constexpr int kTcPairsPerLane = kMma / 2;  // a lane's entries of a 16 x 16 tile
template <typename scalar_t>
using PairStrip = ScoreStrip<scalar_t, kMma>;  // a 16 x 16 tile's scores; 16 bits: two tiles side by side

// 16 query rows of q and dO, with their lse and delta: what both backward kernels stage per step.
template <typename scalar_t>
struct QueryTile {
  __align__(32) scalar_t q[kMma][kHeadPitch];
  __align__(32) scalar_t dout[kMma][kHeadPitch];
  float lse[kMma];
  float delta[kMma];
};

// Block-wide: rows q0 .. q0 + 15 of window-head bh (its q, dO at base), zero past n.
template <typename scalar_t>
__device__ __forceinline__ void stage_query_tile(QueryTile<scalar_t>& tile, const scalar_t* __restrict__ q,
                                                 const scalar_t* __restrict__ grad_out, const float* __restrict__ lse,
                                                 const float* __restrict__ delta, int64_t bh, int q0, int n, int d) {
  const int64_t base = bh * n * d;
  load_head_tile(tile.q, q + base, q0, kMma, n, d, threadIdx.x, kThreads);
  load_head_tile(tile.dout, grad_out + base, q0, kMma, n, d, threadIdx.x, kThreads);
  for (int e = threadIdx.x; e < kMma; e += kThreads) {
    const bool ok = q0 + e < n;
    tile.lse[e] = ok ? lse[bh * n + q0 + e] : 0.f;
    tile.delta[e] = ok ? delta[bh * n + q0 + e] : 0.f;
  }
}

// This lane's entries of the 16 x 16 product a_rows . b_rows^T (row lane / 2, columns lane % 2 + 2t),
// computed on tensor cores and read back through the warp's strip.
template <typename scalar_t>
__device__ __forceinline__ void lane_entries_of_product(float (&entries)[kTcPairsPerLane], PairStrip<scalar_t>& strip,
                                                        const scalar_t (*a_rows)[kHeadPitch],
                                                        const scalar_t (*b_rows)[kHeadPitch], int steps, int lane) {
  FragAcc frag;
  rows_dot_rows(frag, a_rows, b_rows, steps);
  wmma::store_matrix_sync(&strip.f32[0][0], frag, PairStrip<scalar_t>::kPitch, wmma::mem_row_major);
  __syncwarp();
#pragma unroll
  for (int t = 0; t < kTcPairsPerLane; ++t) entries[t] = strip.f32[lane / 2][lane % 2 + 2 * t];
  __syncwarp();  // every lane has read before the strip is written again
}

template <typename scalar_t>
struct DqTcSmem {
  QueryTile<scalar_t> query;
  WarpRows<scalar_t> rows[kWarps];     // the warp's key tile of k and v, then its dq partial
  PairStrip<scalar_t> pair[kWarps];    // S, then dP (fp32), then dS (16 bits)
  // dS of the block's rows summed over the split's windows; entry (i, key) is only ever touched
  // by one lane (of the warp that owns the key's tile): no races, a fixed order.
  float dbias[kTcDqBlockQ][kMaxSeq];
};
static_assert(sizeof(DqTcSmem<c10::BFloat16>) <= kMaxStaticShared, "DqTcSmem must fit in static shared memory");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_dq_tc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                  const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const float* __restrict__ bias, const float* __restrict__ mask,
                                  scalar_t* __restrict__ grad_q, float* __restrict__ dbias_parts, int64_t windows,
                                  int heads, int n, int n_keys, int d, int num_masks, float scale) {
#if ADAPTSR_TENSOR_CORES
  __shared__ DqTcSmem<scalar_t> sm;
  const int split = blockIdx.x, num_splits = gridDim.x, h = blockIdx.y, q0 = blockIdx.z * kTcDqBlockQ;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int steps = head_steps(d);
  const bool want_dbias = dbias_parts != nullptr;  // only with n_keys <= kMaxSeq (the host checks)
  const int64_t plane = static_cast<int64_t>(n) * n_keys;
  const float* bias_h = bias != nullptr ? bias + h * plane : nullptr;
  // Lanes 2i and 2i + 1 take row i of a 16 x 16 tile, every other key.
  const int i = lane / 2, half = lane % 2, row = q0 + i;
  WarpRows<scalar_t>& own = sm.rows[warp];
  PairStrip<scalar_t>& pair = sm.pair[warp];

  for (int e = tid; e < kTcDqBlockQ * kMaxSeq; e += kThreads) sm.dbias[e / kMaxSeq][e % kMaxSeq] = 0.f;

  for (int64_t b = split; b < windows; b += num_splits) {
    const int64_t bh = b * heads + h;
    const int64_t base = bh * n * d, kv_base = bh * n_keys * d;
    const float* mask_w = mask != nullptr ? mask + (b % num_masks) * plane : nullptr;

    __syncthreads();  // the previous window's readers of q, dO and the dq partials are done
    stage_query_tile(sm.query, q, grad_out, lse, delta, bh, q0, n, d);
    __syncthreads();

    FragAcc dq_frag[kMaxHeadSteps];
#pragma unroll
    for (int s = 0; s < kMaxHeadSteps; ++s) wmma::fill_fragment(dq_frag[s], 0.f);
    for (int k0 = warp * kMma; k0 < n_keys; k0 += kWarps * kMma) {
      load_head_tile(own.kv.k, k + kv_base, k0, kMma, n_keys, d, lane, kWarpSize);
      load_head_tile(own.kv.v, v + kv_base, k0, kMma, n_keys, d, lane, kWarpSize);
      __syncwarp();

      // -- S = q k^T, then dP = dO v^T: this lane's entries --
      float s_pair[kTcPairsPerLane], dp_pair[kTcPairsPerLane];
      lane_entries_of_product(s_pair, pair, sm.query.q, own.kv.k, steps, lane);
      lane_entries_of_product(dp_pair, pair, sm.query.dout, own.kv.v, steps, lane);

      // -- dS = P (dP - delta), into the dbias sum and, in 16 bits, the strip --
#pragma unroll
      for (int t = 0; t < kTcPairsPerLane; ++t) {
        const int j = half + 2 * t, key = k0 + j;
        const float ds = prob_and_grad(s_pair[t], dp_pair[t], scale, bias_h, mask_w, row, key, n, n_keys,
                                       sm.query.lse[i], sm.query.delta[i]).ds;
        if (want_dbias && key < n_keys) sm.dbias[i][key] += ds;
        pair.b16[i][j] = from_float<scalar_t>(ds);
      }
      __syncwarp();

      // -- dq += dS k over the tile's 16 keys --
      accumulate_weighted_rows(dq_frag, &pair.b16[0][0], PairStrip<scalar_t>::kPitch16, own.kv.k, steps);
      __syncwarp();  // k, v and the strip are read before the next key tile replaces them
    }

    // -- dq rows: scale times the warps' partials summed in warp order, one contiguous run --
#pragma unroll
    for (int s = 0; s < kMaxHeadSteps; ++s)
      if (s < steps) wmma::store_matrix_sync(&own.out[0][s * kMma], dq_frag[s], kHeadPitchF32, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < kTcDqBlockQ * d; e += kThreads) {
      const int r = e / d, c = e % d;
      if (q0 + r >= n) break;  // rows only grow with e
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sm.rows[w].out[r][c];
      grad_q[base + static_cast<int64_t>(q0 + r) * d + c] = from_float<scalar_t>(scale * sum);
    }
  }

  // -- this split's dbias partial: dbias_parts[split][h][i][j], one writer per entry --
  if (want_dbias) {
    __syncthreads();
    float* part = dbias_parts + (static_cast<int64_t>(split) * heads + h) * plane;
    for (int e = tid; e < kTcDqBlockQ * n_keys; e += kThreads) {
      const int r = e / n_keys, key = e % n_keys;
      if (q0 + r < n) part[static_cast<int64_t>(q0 + r) * n_keys + key] = sm.dbias[r][key];
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// dk and dv: one block per (window, head, 64 keys); warp w owns keys 16 w .. 16 w + 15 and loops
// over the window's queries 16 at a time
// ---------------------------------------------------------------------------------------------

constexpr int kTcKvBlockK = kWarps * kMma;
constexpr int kTcKvBlockQ = kMma;
static_assert(kTcDqBlockQ == kMma && kTcKvBlockQ == kMma, "both kernels stage QueryTile's 16 rows");

template <typename scalar_t>
struct DkdvTcSmem {
  QueryTile<scalar_t> query;
  WarpRows<scalar_t> rows[kWarps];   // the warp's k and v rows, then its dk and dv strips
  PairStrip<scalar_t> pair[kWarps];  // S^T, then dP^T (fp32), then P^T | dS^T (16 bits)
};
static_assert(sizeof(DkdvTcSmem<c10::BFloat16>) <= kMaxStaticShared, "DkdvTcSmem must fit in static shared memory");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    window_attention_dkdv_tc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    const float* __restrict__ bias, const float* __restrict__ mask,
                                    scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, int heads, int n,
                                    int n_keys, int d, int num_masks, float scale) {
#if ADAPTSR_TENSOR_CORES
  __shared__ DkdvTcSmem<scalar_t> sm;
  const int b = blockIdx.x, h = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int steps = head_steps(d);
  const int64_t bh = static_cast<int64_t>(b) * heads + h;
  const int64_t kv_base = bh * n_keys * d;
  const int64_t plane = static_cast<int64_t>(n) * n_keys;
  const float* bias_h = bias != nullptr ? bias + h * plane : nullptr;
  const float* mask_w = mask != nullptr ? mask + (b % num_masks) * plane : nullptr;
  const int k0 = blockIdx.z * kTcKvBlockK + warp * kMma;  // the warp's first key
  // Lanes 2j and 2j + 1 take key row j of a 16 x 16 transposed tile, every other query.
  const int j = lane / 2, half = lane % 2, key = k0 + j;
  WarpRows<scalar_t>& own = sm.rows[warp];
  PairStrip<scalar_t>& pair = sm.pair[warp];
  constexpr int kDsColumn = kMma;  // dS^T sits beside P^T in the 16-bit view of the strip

  load_head_tile(own.kv.k, k + kv_base, k0, kMma, n_keys, d, lane, kWarpSize);
  load_head_tile(own.kv.v, v + kv_base, k0, kMma, n_keys, d, lane, kWarpSize);

  FragAcc dk_frag[kMaxHeadSteps], dv_frag[kMaxHeadSteps];
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s) {
    wmma::fill_fragment(dk_frag[s], 0.f);
    wmma::fill_fragment(dv_frag[s], 0.f);
  }
  for (int q0 = 0; q0 < n; q0 += kTcKvBlockQ) {
    __syncthreads();  // the warps' k, v are loaded; the previous query tile's readers are done
    stage_query_tile(sm.query, q, grad_out, lse, delta, bh, q0, n, d);
    __syncthreads();

    // -- S^T = k q^T, then dP^T = v dO^T: this lane's entries --
    float s_pair[kTcPairsPerLane], dp_pair[kTcPairsPerLane];
    lane_entries_of_product(s_pair, pair, own.kv.k, sm.query.q, steps, lane);
    lane_entries_of_product(dp_pair, pair, own.kv.v, sm.query.dout, steps, lane);

    // -- P^T and dS^T = P^T (dP^T - delta) in 16 bits, side by side in the strip --
#pragma unroll
    for (int t = 0; t < kTcPairsPerLane; ++t) {
      const int i = half + 2 * t;
      const ProbAndGrad entry = prob_and_grad(s_pair[t], dp_pair[t], scale, bias_h, mask_w, q0 + i, key, n, n_keys,
                                              sm.query.lse[i], sm.query.delta[i]);
      pair.b16[j][i] = from_float<scalar_t>(entry.p);
      pair.b16[j][kDsColumn + i] = from_float<scalar_t>(entry.ds);
    }
    __syncwarp();

    // -- dv += P^T dO,  dk += dS^T q over the tile's 16 queries --
    accumulate_weighted_rows(dv_frag, &pair.b16[0][0], PairStrip<scalar_t>::kPitch16, sm.query.dout, steps);
    accumulate_weighted_rows(dk_frag, &pair.b16[0][kDsColumn], PairStrip<scalar_t>::kPitch16, sm.query.q, steps);
  }

  // -- dk (times scale), then dv, through the warp's strip, where its k and v rows were (the
  // loop's __syncwarp calls after S^T and dP^T have ordered every lane's reads of them) --
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s)
    if (s < steps) wmma::store_matrix_sync(&own.out[0][s * kMma], dk_frag[s], kHeadPitchF32, wmma::mem_row_major);
  __syncwarp();
  store_head_strip(grad_k + kv_base, own.out, nullptr, scale, k0, n_keys, d, lane);
  __syncwarp();
#pragma unroll
  for (int s = 0; s < kMaxHeadSteps; ++s)
    if (s < steps) wmma::store_matrix_sync(&own.out[0][s * kMma], dv_frag[s], kHeadPitchF32, wmma::mem_row_major);
  __syncwarp();
  store_head_strip(grad_v + kv_base, own.out, nullptr, 1.f, k0, n_keys, d, lane);
#endif
}

// ---------------------------------------------------------------------------------------------
// the kernels a launch runs: the tensor-core ones for 16-bit inputs on a GPU that has them (the
// host decides `tensor_cores`), fp32 always on CUDA cores; each pair takes the same arguments
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct AttentionKernels {
  decltype(&window_attention_fwd_kernel<scalar_t>) fwd;
  decltype(&window_attention_dq_kernel<scalar_t>) dq;
  decltype(&window_attention_dkdv_kernel<scalar_t>) dkdv;
};

template <typename scalar_t>
inline AttentionKernels<scalar_t> attention_kernels(bool tensor_cores) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      return {&window_attention_fwd_tc_kernel<scalar_t>, &window_attention_dq_tc_kernel<scalar_t>,
              &window_attention_dkdv_tc_kernel<scalar_t>};
    }
  }
  return {&window_attention_fwd_kernel<scalar_t>, &window_attention_dq_kernel<scalar_t>,
          &window_attention_dkdv_kernel<scalar_t>};
}

}  // namespace window_attention
}  // namespace adaptsr
