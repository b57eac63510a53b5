// Tensor-core versions of the z and dA kernels (lora_lowrank_grads_kernel.cuh has the math, the
// grids and the u/dB kernel) for fp16 and bf16 inputs, and for fp32 inputs in TF32 where torch's
// own products would be (the host decides), on sm_80 and later.
//
// The two are the pass's 9-tap work (2 M r taps C_in/g multiply-adds each, ten times the u/dB
// kernel's at 3x3), which on CUDA cores is compute-bound far above the bytes' floor. Per 64-pixel
// tile both are one [64 x 64] x [64 x r] product in 16 x 16 x k tiles (k = 16 for 16-bit, 8 for
// TF32), fp32 accumulators kept in the warps' fragments across the block's whole loop:
//
//     z  [64 pixels x r]   += X [64 pixels x 64 channels] . A^T [64 channels x r]   (per tap, channel tile)
//     dA [r x 64 channels] += u^T [r x 64 pixels] . X [64 pixels x 64 channels]    (per pixel tile)
//
// Eight warps, one 16 x 16 accumulator each: four cover the 64 rows (z: pixels) or columns (dA:
// channels) of the block's tile, times two rank tiles when the chunk has more than 16 ranks;
// with 16 or fewer, the two sets of four split the reduction (z: channels, dA: pixels) in halves
// that are added at the end. The operands X and A, or u, are rounded to x's 16-bit type, as the
// thin convolutions of plain torch round them, or for fp32 x to TF32 as cuDNN's do with
// allow_tf32; everything else stays fp32.

#pragma once

#include "../tensor_core.cuh"
#include "lora_lowrank_grads_kernel.cuh"

namespace adaptsr {
namespace lowrank {

constexpr int kWarps = kThreads / kWarpSize;
constexpr int kFrags = kTile / kMma;  // 16-wide fragments across a 64-wide tile
// k-steps of the tensor-core tiles across a 64-long reduction: 4 of 16 (16-bit), 8 of 8 (TF32).
template <typename scalar_t>
constexpr int kSteps = kTile / TensorCoreTile<scalar_t>::kDepth;
// Row pitches of the tiles: load_matrix_sync wants 32-byte aligned rows of a multiple of 16
// bytes; 8 elements more than the width also spread the rows over the shared-memory banks.
constexpr int kSlabPitch = kTile + 8;
constexpr int kRankPitch = kMaxChunkRank + 8;
static_assert(kWarps == 2 * kFrags && kMaxChunkRank == 2 * kMma, "two sets of four warps, two rank tiles");

// Which accumulator tile a warp owns, and which half of the reduction it takes.
struct WarpTile {
  int frag;       // 16-row (z) or 16-column (dA) slice of the 64-wide tile
  int rank_tile;  // ranks [16 rank_tile, 16 rank_tile + 16) of the chunk
  int half;       // with a single rank tile: the half of the reduction (else 0)
  int halves;     // 2 with a single rank tile, else 1
};

__device__ __forceinline__ WarpTile warp_tile(int chunk_rank) {
  const int warp = threadIdx.x / kWarpSize;
  const bool two_rank_tiles = chunk_rank > kMma;
  return {warp % kFrags, two_rank_tiles ? warp / kFrags : 0, two_rank_tiles ? 0 : warp / kFrags,
          two_rank_tiles ? 1 : 2};
}

// -- z kernel on tensor cores --

template <typename scalar_t>
struct ZTcSmem {
  PixelTile tile;
  __align__(32) scalar_t slab[kTile][kSlabPitch];      // x at one tap, 64 channels
  __align__(32) scalar_t weights[kTile][kRankPitch];   // A^T: channel rows, rank columns
  __align__(32) float out[2][kTile][kMma * 2];          // the halves' (or rank tiles') z, [pixel][rank]
};

template <typename scalar_t, Staging kStaging>
__global__ void __launch_bounds__(kThreads)
    lowrank_z_tc_kernel(const scalar_t* __restrict__ x,
                        const float* __restrict__ a_mat,  // [R][taps * C_in/g], (t, c) order
                        float* __restrict__ z,            // [M][groups * R]
                        const ConvShape shape, int rank_chunks) {
#if ADAPTSR_TENSOR_CORES
  __shared__ ZTcSmem<scalar_t> sm;
  const GroupChunk gc = group_chunk(shape, blockIdx.y, rank_chunks);
  const WarpTile wt = warp_tile(gc.chunk_rank);
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kTile;

  set_pixel_tile(sm.tile, shape, first_pixel);
  __syncthreads();

  constexpr int kDepth = TensorCoreTile<scalar_t>::kDepth;
  AccumulatorFragment<scalar_t> acc;
  wmma::fill_fragment(acc, 0.f);
  for_each_z_chunk<scalar_t, kStaging>(sm, x, a_mat, shape, gc, [&](int) {
    // this warp's 16 pixels x 16 ranks over its channel steps (zero past `count`)
    for (int step = wt.half; step < kSteps<scalar_t>; step += wt.halves) {
      OperandFragment<wmma::matrix_a, scalar_t, wmma::row_major> xa;
      OperandFragment<wmma::matrix_b, scalar_t, wmma::row_major> ab;
      load_operand(xa, &sm.slab[wt.frag * kMma][step * kDepth], kSlabPitch);
      load_operand(ab, &sm.weights[step * kDepth][wt.rank_tile * kMma], kRankPitch);
      wmma::mma_sync(acc, xa, ab, acc);
    }
  });
  // -- out[half][pixel][rank]: halves side by side in rank tiles' place; then z's rows --
  const int slot = wt.halves == 2 ? wt.half : 0;
  wmma::store_matrix_sync(&sm.out[slot][wt.frag * kMma][wt.rank_tile * kMma], acc, kMma * 2, wmma::mem_row_major);
  __syncthreads();
  const int64_t row_stride = static_cast<int64_t>(shape.groups) * shape.rank;
  for (int i = threadIdx.x; i < kTile * gc.chunk_rank; i += kThreads) {
    const int p = i / gc.chunk_rank, k = i % gc.chunk_rank;
    if (sm.tile.n[p] < 0) continue;
    const float v = wt.halves == 2 ? sm.out[0][p][k] + sm.out[1][p][k] : sm.out[0][p][k];
    z[(first_pixel + p) * row_stride + gc.group * shape.rank + gc.rank0 + k] = v;
  }
#endif
}

// Static shared memory ends at 48 KB; the fp32 (TF32) tiles are the larger.
static_assert(sizeof(ZTcSmem<float>) <= 48 * 1024, "the z kernel's fp32 shared memory passes the static 48 KB");

// -- dA kernel on tensor cores --

template <typename scalar_t>
struct DaTcSmem {
  PixelTile tile;
  __align__(32) scalar_t slab[kTile][kSlabPitch];   // x at the block's tap
  __align__(32) scalar_t u_rows[kTile][kRankPitch];  // u of the tile's pixels: [pixel][rank]
  __align__(32) float out[2][kMma][kTile];            // the halves' (or rank tiles') dA, [rank][channel]
};

template <typename scalar_t, Staging kStaging>
__global__ void __launch_bounds__(kThreads)
    lowrank_da_tc_kernel(const scalar_t* __restrict__ x,
                         const float* __restrict__ u_part,  // [o_tiles][M][groups * R]
                         float* __restrict__ ws_a,          // [splits][groups][R][taps * C_in/g]
                         const ConvShape shape, int rank_chunks, int o_tiles) {
#if ADAPTSR_TENSOR_CORES
  __shared__ DaTcSmem<scalar_t> sm;
  const GroupChunk gc = group_chunk(shape, blockIdx.z, rank_chunks);
  const WarpTile wt = warp_tile(gc.chunk_rank);
  const DaColumn col = da_column(shape);

  constexpr int kDepth = TensorCoreTile<scalar_t>::kDepth;
  AccumulatorFragment<scalar_t> acc;
  wmma::fill_fragment(acc, 0.f);
  const PixelRun run = pixel_run(shape, blockIdx.y, gridDim.y);
  for (int64_t tile = run.first; tile < run.end; ++tile) {
    // u summed over output tiles in fp32, then rounded to x's type (or to TF32) for the tensor cores
    stage_da_tile<scalar_t, kStaging>(sm, x, u_part, shape, gc, col, tile * kTile, o_tiles);
    // -- this warp's 16 ranks x 16 channels over its pixel steps: u^T is u_rows read column-major --
    for (int step = wt.half; step < kSteps<scalar_t>; step += wt.halves) {
      OperandFragment<wmma::matrix_a, scalar_t, wmma::col_major> ua;
      OperandFragment<wmma::matrix_b, scalar_t, wmma::row_major> xb;
      load_operand(ua, &sm.u_rows[step * kDepth][wt.rank_tile * kMma], kRankPitch);
      load_operand(xb, &sm.slab[step * kDepth][wt.frag * kMma], kSlabPitch);
      wmma::mma_sync(acc, ua, xb, acc);
    }
    __syncthreads();
  }

  // -- out[half or rank tile][rank][channel], then this block's partial of dA --
  const int slot = wt.halves == 2 ? wt.half : wt.rank_tile;
  wmma::store_matrix_sync(&sm.out[slot][0][wt.frag * kMma], acc, kTile, wmma::mem_row_major);
  __syncthreads();
  const int64_t k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
  float* const dst = da_partial(ws_a, shape, gc, col);
  for (int i = threadIdx.x; i < gc.chunk_rank * kTile; i += kThreads) {
    const int k = i / kTile, c = i % kTile;
    if (c >= col.count) continue;
    const float v = wt.halves == 2 ? sm.out[0][k][c] + sm.out[1][k][c] : sm.out[k / kMma][k % kMma][c];
    dst[k * k_len + c] = v;
  }
#endif
}

}  // namespace lowrank
}  // namespace adaptsr
