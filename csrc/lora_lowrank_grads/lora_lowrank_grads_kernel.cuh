// The fused low-rank gradient pass of a LoRA convolution (a LoRA linear layer is the 1x1 case).
//
// For one group g of a convolution, output pixels p (flattened over batch and space), the input
// patch X[p, (t, c)] that kernel tap t sees in input channel c of the group, A: [r, C_in/g, kh, kw],
// B: [C_out, r] and scaling s:
//
//     u[p, k]     = sum_o dy[p, o] B[o, k]                 (B^T dy: r channels)
//     z[p, k]     = sum_(t,c) X[p, (t, c)] A[k, c, t]       (conv(x, A): r channels)
//     dA[k, c, t] = s sum_g sum_p u[p, k] X[p, (t, c)]
//     dB[o, k]    = s sum_p dy[p, o] z[p, k]
//
// One thread block owns a group g, a chunk of at most kMaxChunkRank ranks (ranks are independent:
// u, z, dA and dB of rank k only involve rank k) and a strided set of kTilePixels-pixel tiles.
// Per tile it makes three passes, each staging a [pixels x channels] slab in shared memory (fp32):
//
//     1. dy  -> u                       (u kept in shared memory for pass 2)
//     2. x   -> z, and dA += u^T X      (x is read once per tap: every product that needs x)
//     3. dy  -> dB += dy^T z            (the second read of the tile's dy rows comes from L2)
//
// Staging is coalesced over channels when the channel stride is 1 (channels-last images, and the
// linear layer) and over pixels otherwise (NCHW). Partial dA and dB live in a per-block slab of a
// float32 workspace, each entry owned by one thread: no atomics. A second kernel sums the slabs
// over blocks in a fixed order, so the result is deterministic. All arithmetic is fp32.
//
// Not tuned (no GPU measurements yet): the products run on CUDA cores (FMA from shared memory),
// not tensor cores, and every tile adds its partial dA (r x taps x C/g floats) to the block's slab,
// L2 traffic that larger tiles or a shared-memory accumulator would cut. GPU timings decide.

#pragma once

#include <cstdint>

#include "../common.cuh"

namespace adaptsr {
namespace lowrank {

constexpr int kThreads = 256;
constexpr int kTilePixels = 64;                             // P: output pixels per tile
constexpr int kRankGroups = kThreads / kTilePixels;         // threads sharing one pixel in passes 1-2
constexpr int kMaxChunkRank = 32;                           // ranks per block; more ranks -> more blocks
constexpr int kRanksPerThread = kMaxChunkRank / kRankGroups;
constexpr int kChannelChunk = 32;                           // channels staged per step (one warp wide)
// Blocks per SM the grid aims at: 29 KB of shared memory and 256 threads per block allow about 4
// resident blocks per SM on Ampere/Hopper; more blocks only grow the workspace.
constexpr int kBlocksPerSM = 4;

static_assert(kThreads % kTilePixels == 0, "threads must split evenly over the tile's pixels");
static_assert(kMaxChunkRank % kRankGroups == 0, "ranks must split evenly over the rank groups");

struct ConvShape {
  int64_t pixels;  // M = N * HO * WO
  int height, width, out_height, out_width;
  int in_per_group, out_per_group, out_channels, rank;
  int taps, kernel_w;  // taps = kh * kw
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t dy_sn, dy_sc, dy_sh, dy_sw;
};

struct TileSmem {
  float slab[kTilePixels][kChannelChunk + 1];  // +1: the pixel-major reads of passes 1-2 avoid bank conflicts
  float weights[kChannelChunk][kMaxChunkRank];  // the staged rows of A (pass 2) or B (pass 1)
  float u[kTilePixels][kMaxChunkRank];
  float z[kTilePixels][kMaxChunkRank];
  int pix_n[kTilePixels];   // batch index of the pixel, -1 past the last pixel
  int pix_ih[kTilePixels];  // top-left input row / column the pixel's window starts at
  int pix_iw[kTilePixels];
  int64_t pix_dy[kTilePixels];  // offset of dy[n, 0, oh, ow]
};

// slab[p][c] = src[pixel p, channel c_first + c] (fp32), zero outside [0, count) and for pixels
// past the end. `offset(p, c_global)` returns the element offset or -1 when it falls in the padding.
template <typename scalar_t, bool kChannelsFastest, typename Offset>
__device__ __forceinline__ void stage_slab(TileSmem& sm, const scalar_t* __restrict__ src, int c_first, int count,
                                           Offset offset) {
  for (int i = threadIdx.x; i < kTilePixels * kChannelChunk; i += kThreads) {
    // Consecutive threads take consecutive addresses: channels when they are the unit-stride
    // dimension, pixels otherwise.
    const int p = kChannelsFastest ? i / kChannelChunk : i % kTilePixels;
    const int c = kChannelsFastest ? i % kChannelChunk : i / kTilePixels;
    float v = 0.f;
    if (c < count && sm.pix_n[p] >= 0) {
      const int64_t off = offset(p, c_first + c);
      if (off >= 0) v = to_float(src[off]);
    }
    sm.slab[p][c] = v;
  }
}

template <typename scalar_t, bool kChannelsFastest>
__global__ void __launch_bounds__(kThreads)
    lora_lowrank_grads_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                              const float* __restrict__ a_mat,  // [R][taps * C_in/g], (t, c) order
                              const float* __restrict__ b_mat,  // [C_out][R]
                              float* __restrict__ ws_a,         // [splits][groups][R][taps * C_in/g]
                              float* __restrict__ ws_b,         // [splits][C_out][R]
                              const ConvShape shape) {
  __shared__ TileSmem sm;

  const int split = blockIdx.x;
  const int num_splits = gridDim.x;
  const int group = blockIdx.y;
  const int num_groups = gridDim.y;
  const int rank0 = blockIdx.z * kMaxChunkRank;
  const int chunk_rank = min(kMaxChunkRank, shape.rank - rank0);

  const int tid = threadIdx.x;
  const int my_pixel = tid % kTilePixels;  // passes 1-2: this thread's pixel ...
  const int my_rank0 = tid / kTilePixels;  // ... and ranks my_rank0 + j * kRankGroups

  const int in_pg = shape.in_per_group;
  const int out_pg = shape.out_per_group;
  const int64_t k_len = static_cast<int64_t>(shape.taps) * in_pg;  // K: columns of A's matrix
  const int x_c0 = group * in_pg;
  const int dy_c0 = group * out_pg;
  float* const slab_a = ws_a + ((static_cast<int64_t>(split) * num_groups + group) * shape.rank + rank0) * k_len;
  float* const slab_b = ws_b + static_cast<int64_t>(split) * shape.out_channels * shape.rank;

  auto dy_offset = [&](int p, int o) -> int64_t { return sm.pix_dy[p] + o * shape.dy_sc; };

  const int64_t num_tiles = (shape.pixels + kTilePixels - 1) / kTilePixels;
  for (int64_t tile = split; tile < num_tiles; tile += num_splits) {
    // -- pixel coordinates of this tile (the previous tile ended with a barrier) --
    for (int p = tid; p < kTilePixels; p += kThreads) {
      const int64_t m = tile * kTilePixels + p;
      if (m < shape.pixels) {
        const int64_t per_image = static_cast<int64_t>(shape.out_height) * shape.out_width;
        const int n = static_cast<int>(m / per_image);
        const int rem = static_cast<int>(m % per_image);
        const int oh = rem / shape.out_width;
        const int ow = rem % shape.out_width;
        sm.pix_n[p] = n;
        sm.pix_ih[p] = oh * shape.stride_h - shape.pad_h;
        sm.pix_iw[p] = ow * shape.stride_w - shape.pad_w;
        sm.pix_dy[p] = n * shape.dy_sn + oh * shape.dy_sh + ow * shape.dy_sw;
      } else {
        sm.pix_n[p] = -1;
      }
    }
    __syncthreads();

    // -- pass 1: u[p, k] = sum_o dy[p, o] B[o, k] --
    float acc[kRanksPerThread];
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) acc[j] = 0.f;
    for (int o0 = 0; o0 < out_pg; o0 += kChannelChunk) {
      const int count = min(kChannelChunk, out_pg - o0);
      stage_slab<scalar_t, kChannelsFastest>(sm, dy, dy_c0 + o0, count, dy_offset);
      for (int i = tid; i < kChannelChunk * kMaxChunkRank; i += kThreads) {
        const int o = i / kMaxChunkRank, k = i % kMaxChunkRank;
        sm.weights[o][k] = (o < count && k < chunk_rank) ? b_mat[static_cast<int64_t>(dy_c0 + o0 + o) * shape.rank + rank0 + k] : 0.f;
      }
      __syncthreads();
      for (int o = 0; o < count; ++o) {
        const float d = sm.slab[my_pixel][o];
#pragma unroll
        for (int j = 0; j < kRanksPerThread; ++j) acc[j] += d * sm.weights[o][my_rank0 + j * kRankGroups];
      }
      __syncthreads();
    }
    // Ranks past chunk_rank got zero weights, so their u is zero.
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) sm.u[my_pixel][my_rank0 + j * kRankGroups] = acc[j];

    // -- pass 2: z[p, k] = sum_(t,c) X[p, (t, c)] A[k, c, t] and dA[k, c, t] += sum_p u[p, k] X[p, (t, c)] --
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) acc[j] = 0.f;
    for (int t = 0; t < shape.taps; ++t) {
      const int dh = (t / shape.kernel_w) * shape.dil_h;
      const int dw = (t % shape.kernel_w) * shape.dil_w;
      auto x_offset = [&](int p, int c) -> int64_t {
        const int ih = sm.pix_ih[p] + dh, iw = sm.pix_iw[p] + dw;
        if (ih < 0 || ih >= shape.height || iw < 0 || iw >= shape.width) return -1;  // zero padding
        return sm.pix_n[p] * shape.x_sn + c * shape.x_sc + ih * shape.x_sh + iw * shape.x_sw;
      };
      for (int c0 = 0; c0 < in_pg; c0 += kChannelChunk) {
        const int count = min(kChannelChunk, in_pg - c0);
        stage_slab<scalar_t, kChannelsFastest>(sm, x, x_c0 + c0, count, x_offset);
        const int64_t col0 = static_cast<int64_t>(t) * in_pg + c0;  // column of (t, c0) in A's matrix
        for (int i = tid; i < kChannelChunk * kMaxChunkRank; i += kThreads) {
          const int c = i / kMaxChunkRank, k = i % kMaxChunkRank;
          sm.weights[c][k] = (c < count && k < chunk_rank) ? a_mat[(rank0 + k) * k_len + col0 + c] : 0.f;
        }
        __syncthreads();
        for (int c = 0; c < count; ++c) {
          const float xv = sm.slab[my_pixel][c];
#pragma unroll
          for (int j = 0; j < kRanksPerThread; ++j) acc[j] += xv * sm.weights[c][my_rank0 + j * kRankGroups];
        }
        // Entry (k, c) of this step's dA columns belongs to thread (k * kChannelChunk + c) mod kThreads,
        // the same thread on every tile: a plain read-modify-write of the block's own slab.
        for (int i = tid; i < chunk_rank * kChannelChunk; i += kThreads) {
          const int k = i / kChannelChunk, c = i % kChannelChunk;
          if (c < count) {
            float s = 0.f;
            for (int p = 0; p < kTilePixels; ++p) s += sm.u[p][k] * sm.slab[p][c];
            slab_a[k * k_len + col0 + c] += s;
          }
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) sm.z[my_pixel][my_rank0 + j * kRankGroups] = acc[j];

    // -- pass 3: dB[o, k] += sum_p dy[p, o] z[p, k] --
    for (int o0 = 0; o0 < out_pg; o0 += kChannelChunk) {
      const int count = min(kChannelChunk, out_pg - o0);
      stage_slab<scalar_t, kChannelsFastest>(sm, dy, dy_c0 + o0, count, dy_offset);
      __syncthreads();
      for (int i = tid; i < kChannelChunk * chunk_rank; i += kThreads) {
        const int o = i / chunk_rank, k = i % chunk_rank;
        if (o < count) {
          float s = 0.f;
          for (int p = 0; p < kTilePixels; ++p) s += sm.slab[p][o] * sm.z[p][k];
          slab_b[static_cast<int64_t>(dy_c0 + o0 + o) * shape.rank + rank0 + k] += s;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace lowrank
}  // namespace adaptsr
