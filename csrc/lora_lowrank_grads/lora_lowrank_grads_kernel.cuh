// The low-rank gradient pass of a LoRA convolution (a LoRA linear layer is the 1x1 case).
//
// For one group g of a convolution, output pixels p (flattened over batch and space), the input
// patch X[p, (t, c)] that kernel tap t sees in input channel c of the group, A: [r, C_in/g, kh, kw],
// B: [C_out, r] and scaling s:
//
//     z[p, k]     = sum_(t,c) X[p, (t, c)] A[k, c, t]       (conv(x, A): r channels)
//     u[p, k]     = sum_o dy[p, o] B[o, k]                 (B^T dy: r channels)
//     dA[k, c, t] = s sum_g sum_p u[p, k] X[p, (t, c)]
//     dB[o, k]    = s sum_p dy[p, o] z[p, k]
//
// Three streaming kernels, each reading its large input once and accumulating in registers:
//
//     z kernel,    reads x:   z  -> float32 [M, g r]                     one block per pixel tile
//     u/dB kernel, reads dy:  u  -> float32 [output tiles, M, g r]       (partial over output tiles)
//                             dB -> float32 [splits, C_out, r]           (partial over pixel runs)
//     dA kernel,   reads x:   dA -> float32 [splits, g, r, taps C_in/g]  (partial over pixel runs)
//
// The u/dB and dA kernels are split-K reductions over pixels: a block owns one column tile (64
// output channels, or one tap and 64 input channels) and a contiguous run of pixel tiles, keeps
// its partial dB or dA in registers across the whole run and writes it once. The host sums the
// partials over runs (and groups, which share A) in a fixed order: deterministic, no atomics. The
// blocks of one pixel run are launched next to each other (the column tile is grid.x), so the
// taps' overlapping reads of x come from L2. All arithmetic is fp32, on CUDA cores: each thread
// holds kRanksPerThread accumulators and reads its operands from shared memory, one of them a
// broadcast across the warp. For fp16 and bf16 on sm_80 and later the z and dA kernels have
// tensor-core versions with the same grids (lora_lowrank_grads_tc_kernel.cuh).
//
// Threads: four per pixel (z, u) or per column (dA, dB). With r > 16 in a block's chunk the four
// take a quarter of the ranks each; with fewer ranks they share the ranks and split the
// reduction (channels, output channels or pixels) instead, and sum their parts at the end through
// shared memory (`LaneSplit`), so every thread works for any r.

#pragma once

#include <cstdint>

#include "../common.cuh"

namespace adaptsr {
namespace lowrank {

constexpr int kThreads = 256;
constexpr int kTile = 64;                            // pixels per tile; channels per column tile
constexpr int kLanes = kThreads / kTile;             // threads sharing one pixel or one column
constexpr int kRanksPerThread = 8;                   // accumulators per thread
constexpr int kMaxChunkRank = kLanes * kRanksPerThread;  // ranks per block; more ranks -> more blocks
// Blocks per SM the split-K grids aim at: each block needs 35-43 KB of shared memory, so about
// five fit on an SM of Ampere/Hopper; more blocks would only grow the workspaces.
constexpr int kBlocksPerSM = 4;

static_assert(kThreads % kTile == 0 && kTile % 32 == 0, "a warp must lie inside one lane group");

struct ConvShape {
  int64_t pixels;  // M = N * HO * WO
  int height, width, out_height, out_width;
  int groups, in_per_group, out_per_group, out_channels, rank;
  int taps, kernel_w;  // taps = kh * kw
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t dy_sn, dy_sc, dy_sh, dy_sw;
};

// How a kernel stages [pixels x channels] slabs of x or dy into shared memory, chosen on the host
// per tensor (staging_of): consecutive threads take consecutive addresses, so pixels when the
// channels are strided (NCHW), channels when they are the unit-stride dimension (channels-last
// images, the linear layer), and 16 or 8 bytes of channels per thread where that is aligned
// (SwinIR-M's 180 channels of bf16 allow 8).
enum class Staging { kPixelRuns, kChannelRuns, kChannelVectors8, kChannelVectors16 };

constexpr int vector_bytes(Staging staging) {
  return staging == Staging::kChannelVectors16 ? 16 : staging == Staging::kChannelVectors8 ? 8 : 0;
}

// The block's place in a launch whose grid.z (grid.y for the z kernel) enumerates the
// (group, rank chunk) pairs: groups * rank_chunks blocks.
struct GroupChunk {
  int group, rank0, chunk_rank;
};

__device__ __forceinline__ GroupChunk group_chunk(const ConvShape& shape, int index, int rank_chunks) {
  const int rank0 = (index % rank_chunks) * kMaxChunkRank;
  return {index / rank_chunks, rank0, min(kMaxChunkRank, shape.rank - rank0)};
}

// How the kLanes threads sharing one pixel or column divide the work: `rank_base` is the first of
// this thread's kRanksPerThread ranks (within the chunk), and it takes every `parts`-th entry of
// the reduction, starting at `part`. rank_groups * parts == kLanes.
struct LaneSplit {
  int rank_base, part, parts;
};

__device__ __forceinline__ LaneSplit lane_split(int chunk_rank) {
  const int rank_groups = chunk_rank <= kRanksPerThread ? 1 : chunk_rank <= 2 * kRanksPerThread ? 2 : kLanes;
  const int lane = threadIdx.x / kTile;
  return {(lane % rank_groups) * kRanksPerThread, lane / rank_groups, kLanes / rank_groups};
}

// Per-pixel coordinates of one tile of output pixels.
struct PixelTile {
  int n[kTile];   // batch index of the pixel, -1 past the last pixel
  int ih[kTile];  // top-left input row / column the pixel's window starts at
  int iw[kTile];
  int64_t dy[kTile];  // offset of dy[n, 0, oh, ow]
};

// The parts of an accumulator that the `parts` threads of a pixel or column hold, summed in part
// order. +1: threads of a warp write rows `index` apart without bank conflicts.
using PartScratch = float[kLanes][kTile][kRanksPerThread + 1];

__device__ __forceinline__ void set_pixel_tile(PixelTile& tile, const ConvShape& shape, int64_t first_pixel) {
  for (int p = threadIdx.x; p < kTile; p += kThreads) {
    const int64_t m = first_pixel + p;
    if (m < shape.pixels) {
      // 32-bit division (the host keeps M below 2^31): a 64-bit one is a called software routine
      const int pixel = static_cast<int>(m);
      const int per_image = shape.out_height * shape.out_width;
      const int n = pixel / per_image;
      const int rem = pixel % per_image;
      const int oh = rem / shape.out_width;
      const int ow = rem % shape.out_width;
      tile.n[p] = n;
      tile.ih[p] = oh * shape.stride_h - shape.pad_h;
      tile.iw[p] = ow * shape.stride_w - shape.pad_w;
      tile.dy[p] = n * shape.dy_sn + oh * shape.dy_sh + ow * shape.dy_sw;
    } else {
      tile.n[p] = -1;
    }
  }
}

// Offset of x[n, c, ih + dh, iw + dw] for pixel p of the tile at the tap offset (dh, dw), or -1
// where that falls in the zero padding.
__device__ __forceinline__ int64_t tap_offset(const PixelTile& tile, const ConvShape& shape, int dh, int dw, int p,
                                              int c) {
  const int ih = tile.ih[p] + dh, iw = tile.iw[p] + dw;
  if (ih < 0 || ih >= shape.height || iw < 0 || iw >= shape.width) return -1;
  return tile.n[p] * shape.x_sn + c * shape.x_sc + ih * shape.x_sh + iw * shape.x_sw;
}

// Element j of a vector of scalar_t held as 32-bit words (a vector load), taken apart by shifts:
// taking the words' address instead would put them on the stack.
template <typename scalar_t, int kWords>
__device__ __forceinline__ scalar_t word_element(const uint32_t (&words)[kWords], int j) {
  if constexpr (sizeof(scalar_t) == 4) {
    return __uint_as_float(words[j]);
  } else {
    return scalar_t(static_cast<uint16_t>(words[j / 2] >> (16 * (j % 2))), scalar_t::from_bits());
  }
}

// slab[p][c] = src[pixel p, channel c_first + c] (converted to Elem: fp32 for the CUDA-core
// kernels, x's own 16-bit type for the tensor-core ones), zero for c >= count, for pixels past
// the end, and where `offset(p, c_global)` returns -1 (the zero padding).
template <typename scalar_t, Staging kStaging, typename Elem, int kPitch, typename Offset>
__device__ __forceinline__ void stage_slab(Elem (&slab)[kTile][kPitch], const PixelTile& tile,
                                           const scalar_t* __restrict__ src, int c_first, int count, Offset offset) {
  static_assert(kPitch >= kTile, "a slab row holds the tile's 64 channels");
  if constexpr (vector_bytes(kStaging) > 0) {
    // 16 or 8 bytes of channels per load: the host checked that every run starts aligned (vector_loads)
    constexpr int kVec = vector_bytes(kStaging) / sizeof(scalar_t);
    constexpr int kVecsPerRow = kTile / kVec;
    for (int i = threadIdx.x; i < kTile * kVecsPerRow; i += kThreads) {
      const int p = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec;
      const int64_t off = (c < count && tile.n[p] >= 0) ? offset(p, c_first + c) : -1;
      if (off >= 0 && c + kVec <= count) {
        uint32_t words[vector_bytes(kStaging) / 4];
        if constexpr (vector_bytes(kStaging) == 16) {
          const uint4 run = *reinterpret_cast<const uint4*>(src + off);
          words[0] = run.x, words[1] = run.y, words[2] = run.z, words[3] = run.w;
        } else {
          const uint2 run = *reinterpret_cast<const uint2*>(src + off);
          words[0] = run.x, words[1] = run.y;
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) slab[p][c + j] = static_cast<Elem>(word_element<scalar_t>(words, j));
      } else {  // padding, past the end, or the ragged last channels
#pragma unroll
        for (int j = 0; j < kVec; ++j) slab[p][c + j] = (off >= 0 && c + j < count) ? static_cast<Elem>(src[off + j]) : Elem(0.f);
      }
    }
  } else {
    constexpr bool kChannelsFirst = kStaging == Staging::kChannelRuns;
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int p = kChannelsFirst ? i / kTile : i % kTile;
      const int c = kChannelsFirst ? i % kTile : i / kTile;
      Elem v = Elem(0.f);
      if (c < count && tile.n[p] >= 0) {
        const int64_t off = offset(p, c_first + c);
        if (off >= 0) v = static_cast<Elem>(src[off]);
      }
      slab[p][c] = v;
    }
  }
}

// rows[p][k] = src[(pixel p) * row_stride + k] for k < chunk_rank, zero elsewhere (fp32 source).
__device__ __forceinline__ void load_rank_rows(float (&rows)[kTile][kMaxChunkRank], const PixelTile& tile,
                                               const float* __restrict__ src, int64_t first_pixel, int64_t row_stride,
                                               int chunk_rank) {
  for (int i = threadIdx.x; i < kTile * kMaxChunkRank; i += kThreads) {
    const int p = i / kMaxChunkRank, k = i % kMaxChunkRank;
    rows[p][k] = (k < chunk_rank && tile.n[p] >= 0) ? src[(first_pixel + p) * row_stride + k] : 0.f;
  }
}

// weights[c][k] = A[rank0 + k, c0 + c, tap t] (A^T for channels [c0, c0 + count) at tap t),
// converted to Elem; zero past `count` channels and past the chunk's ranks.
template <typename Elem, int kPitch>
__device__ __forceinline__ void stage_a_columns(Elem (&weights)[kTile][kPitch], const float* __restrict__ a_mat,
                                                const ConvShape& shape, const GroupChunk& gc, int t, int c0,
                                                int count) {
  const int64_t k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
  const float* const column0 = a_mat + static_cast<int64_t>(t) * shape.in_per_group + c0;  // (t, c0) of rank 0
  for (int i = threadIdx.x; i < kTile * kMaxChunkRank; i += kThreads) {
    const int c = i / kMaxChunkRank, k = i % kMaxChunkRank;
    const float a = (c < count && k < gc.chunk_rank) ? column0[(gc.rank0 + k) * k_len + c] : 0.f;
    weights[c][k] = static_cast<Elem>(a);
  }
}

// rows[p][k] = u of pixel p, rank k of the block's chunk: the u/dB kernel's partials summed over its
// output tiles in tile order (fp32), then converted to Elem; zero past the chunk and the pixels.
template <typename Elem, int kPitch>
__device__ __forceinline__ void stage_u_rows(Elem (&rows)[kTile][kPitch], const PixelTile& tile,
                                             const float* __restrict__ u_part, const ConvShape& shape,
                                             const GroupChunk& gc, int64_t first_pixel, int o_tiles) {
  const int64_t row_stride = static_cast<int64_t>(shape.groups) * shape.rank;
  const int64_t o_tile_stride = shape.pixels * row_stride;
  const float* const base = u_part + first_pixel * row_stride + gc.group * shape.rank + gc.rank0;
  for (int i = threadIdx.x; i < kTile * kMaxChunkRank; i += kThreads) {
    const int p = i / kMaxChunkRank, k = i % kMaxChunkRank;
    float v = 0.f;
    if (k < gc.chunk_rank && tile.n[p] >= 0) {
      for (int ob = 0; ob < o_tiles; ++ob) v += base[p * row_stride + k + ob * o_tile_stride];
    }
    rows[p][k] = static_cast<Elem>(v);
  }
}

// The dA kernels' column tile (grid.x): tap t, at offset (dh, dw), and input channels
// [c0, c0 + count) of the group.
struct DaColumn {
  int t, c0, count, dh, dw;
};

__device__ __forceinline__ DaColumn da_column(const ConvShape& shape) {
  const int c_tiles = (shape.in_per_group + kTile - 1) / kTile;
  const int t = blockIdx.x / c_tiles;
  const int c0 = (blockIdx.x % c_tiles) * kTile;
  return {t, c0, min(kTile, shape.in_per_group - c0), (t / shape.kernel_w) * shape.dil_h,
          (t % shape.kernel_w) * shape.dil_w};
}

// &ws_a[split blockIdx.y][group][the chunk's first rank][column (t, c0)]: where the block writes
// its partial of dA, rank rows k_len = taps * C_in/g apart.
__device__ __forceinline__ float* da_partial(float* ws_a, const ConvShape& shape, const GroupChunk& gc,
                                             const DaColumn& col) {
  const int64_t k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
  return ws_a + ((static_cast<int64_t>(blockIdx.y) * shape.groups + gc.group) * shape.rank + gc.rank0) * k_len +
         static_cast<int64_t>(col.t) * shape.in_per_group + col.c0;
}

// The z kernels' loop over the taps and 64-channel chunks of the group: stage x at the tap into
// sm.slab and A^T of those channels into sm.weights, then step(count) between two barriers.
template <typename scalar_t, Staging kStaging, typename Smem, typename Step>
__device__ __forceinline__ void for_each_z_chunk(Smem& sm, const scalar_t* __restrict__ x,
                                                 const float* __restrict__ a_mat, const ConvShape& shape,
                                                 const GroupChunk& gc, Step step) {
  const int in_pg = shape.in_per_group;
  for (int t = 0; t < shape.taps; ++t) {
    const int dh = (t / shape.kernel_w) * shape.dil_h;
    const int dw = (t % shape.kernel_w) * shape.dil_w;
    auto x_offset = [&](int p, int c) { return tap_offset(sm.tile, shape, dh, dw, p, c); };
    for (int c0 = 0; c0 < in_pg; c0 += kTile) {
      const int count = min(kTile, in_pg - c0);
      stage_slab<scalar_t, kStaging>(sm.slab, sm.tile, x, gc.group * in_pg + c0, count, x_offset);
      stage_a_columns(sm.weights, a_mat, shape, gc, t, c0, count);
      __syncthreads();
      step(count);
      __syncthreads();
    }
  }
}

// The dA kernels' operands for one pixel tile, between two barriers: x at the block's tap and
// u of the tile's pixels (`sm`: DaSmem or the tensor-core kernel's DaTcSmem).
template <typename scalar_t, Staging kStaging, typename Smem>
__device__ __forceinline__ void stage_da_tile(Smem& sm, const scalar_t* __restrict__ x,
                                              const float* __restrict__ u_part, const ConvShape& shape,
                                              const GroupChunk& gc, const DaColumn& col, int64_t first_pixel,
                                              int o_tiles) {
  set_pixel_tile(sm.tile, shape, first_pixel);
  __syncthreads();
  auto x_offset = [&](int p, int c) { return tap_offset(sm.tile, shape, col.dh, col.dw, p, c); };
  stage_slab<scalar_t, kStaging>(sm.slab, sm.tile, x, gc.group * shape.in_per_group + col.c0, col.count, x_offset);
  stage_u_rows(sm.u_rows, sm.tile, u_part, shape, gc, first_pixel, o_tiles);
  __syncthreads();
}

// Sums acc over the parts of this thread's pixel or column `index`; the result is valid in the
// thread with part 0. Ends with a barrier: the scratch can be reused at once.
__device__ __forceinline__ void sum_parts(PartScratch& scratch, float (&acc)[kRanksPerThread], const LaneSplit& ls,
                                          int index) {
  if (ls.parts == 1) return;
  const int lane = threadIdx.x / kTile;
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) scratch[lane][index][j] = acc[j];
  __syncthreads();
  if (ls.part == 0) {
    const int rank_groups = kLanes / ls.parts;
    for (int part = 1; part < ls.parts; ++part) {
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) acc[j] += scratch[lane + part * rank_groups][index][j];
    }
  }
  __syncthreads();
}

// acc[j] += v * w[j]: one operand per thread, the other (w, this thread's ranks of a shared-memory
// row) the same for the whole warp, a broadcast.
__device__ __forceinline__ void accumulate_ranks(float (&acc)[kRanksPerThread], float v, const float* w) {
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) acc[j] += v * w[j];
}

// dst[j * stride] = acc[j] for this thread's ranks that lie inside the block's chunk.
__device__ __forceinline__ void store_ranks(float* dst, int64_t stride, const float (&acc)[kRanksPerThread],
                                            const LaneSplit& ls, const GroupChunk& gc) {
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) {
    if (ls.rank_base + j < gc.chunk_rank) dst[j * stride] = acc[j];
  }
}

// -- z kernel: z[p, group r + k] = sum_(t,c) X[p, (t, c)] A[k, c, t], one block per pixel tile --

struct ZSmem {
  PixelTile tile;
  float slab[kTile][kTile + 1];            // x at one tap, 64 channels; +1: pixel-major reads without bank conflicts
  float weights[kTile][kMaxChunkRank];     // A's columns for those channels
  PartScratch scratch;
};

template <typename scalar_t, Staging kStaging>
__global__ void __launch_bounds__(kThreads)
    lowrank_z_kernel(const scalar_t* __restrict__ x,
                     const float* __restrict__ a_mat,  // [R][taps * C_in/g], (t, c) order
                     float* __restrict__ z,            // [M][groups * R]
                     const ConvShape shape, int rank_chunks) {
  __shared__ ZSmem sm;
  const GroupChunk gc = group_chunk(shape, blockIdx.y, rank_chunks);
  const LaneSplit ls = lane_split(gc.chunk_rank);
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kTile;
  const int my_pixel = threadIdx.x % kTile;

  set_pixel_tile(sm.tile, shape, first_pixel);
  __syncthreads();

  float acc[kRanksPerThread];
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) acc[j] = 0.f;
  for_each_z_chunk<scalar_t, kStaging>(sm, x, a_mat, shape, gc, [&](int count) {
    // this thread's channels (every parts-th) of its pixel's dot products
    for (int c = ls.part; c < count; c += ls.parts) {
      accumulate_ranks(acc, sm.slab[my_pixel][c], &sm.weights[c][ls.rank_base]);
    }
  });
  sum_parts(sm.scratch, acc, ls, my_pixel);
  if (ls.part == 0 && sm.tile.n[my_pixel] >= 0) {
    float* row = z + (first_pixel + my_pixel) * (static_cast<int64_t>(shape.groups) * shape.rank) +
                 gc.group * shape.rank + gc.rank0 + ls.rank_base;
    store_ranks(row, 1, acc, ls, gc);
  }
}

// The pixel tiles [first, end) of split `split` of `num_splits` (contiguous runs; the last ones may be empty).
struct PixelRun {
  int64_t first, end;
};

__device__ __forceinline__ PixelRun pixel_run(const ConvShape& shape, int split, int num_splits) {
  const int64_t num_tiles = (shape.pixels + kTile - 1) / kTile;
  const int64_t per_split = (num_tiles + num_splits - 1) / num_splits;
  const int64_t first = split * per_split < num_tiles ? split * per_split : num_tiles;
  return {first, first + per_split < num_tiles ? first + per_split : num_tiles};
}

// -- u/dB kernel: u = dy B (per output tile) and dB partial = dy^T z, one pass over dy --

struct UDbSmem {
  PixelTile tile;
  float slab[kTile][kTile + 1];          // dy, 64 output channels of the tile; +1: reads along either axis are conflict-free
  float weights[kTile][kMaxChunkRank];   // B's rows of those output channels
  float z_rows[kTile][kMaxChunkRank];    // z of the tile's pixels
  PartScratch scratch;
};

template <typename scalar_t, Staging kStaging>
__global__ void __launch_bounds__(kThreads)
    lowrank_u_db_kernel(const scalar_t* __restrict__ dy,
                        const float* __restrict__ b_mat,  // [C_out][R]
                        const float* __restrict__ z,      // [M][groups * R]
                        float* __restrict__ u_part,       // [o_tiles][M][groups * R]
                        float* __restrict__ ws_b,         // [splits][C_out][R]
                        const ConvShape shape, int rank_chunks) {
  __shared__ UDbSmem sm;
  const GroupChunk gc = group_chunk(shape, blockIdx.z, rank_chunks);
  const LaneSplit ls = lane_split(gc.chunk_rank);
  const int o_tile = blockIdx.x;
  const int o_first = gc.group * shape.out_per_group + o_tile * kTile;  // global output channel of column 0
  const int o_count = min(kTile, shape.out_per_group - o_tile * kTile);
  const int64_t row_stride = static_cast<int64_t>(shape.groups) * shape.rank;  // g r: a pixel's row of z and u
  const int64_t col0 = gc.group * shape.rank + gc.rank0;  // this chunk's first column of z and u
  const int mine = threadIdx.x % kTile;  // this thread's pixel (u) and output channel (dB)

  for (int i = threadIdx.x; i < kTile * kMaxChunkRank; i += kThreads) {
    const int o = i / kMaxChunkRank, k = i % kMaxChunkRank;
    sm.weights[o][k] = (o < o_count && k < gc.chunk_rank) ? b_mat[static_cast<int64_t>(o_first + o) * shape.rank + gc.rank0 + k] : 0.f;
  }
  auto dy_offset = [&](int p, int o) -> int64_t { return sm.tile.dy[p] + o * shape.dy_sc; };

  float acc_b[kRanksPerThread];
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) acc_b[j] = 0.f;
  const PixelRun run = pixel_run(shape, blockIdx.y, gridDim.y);
  for (int64_t tile = run.first; tile < run.end; ++tile) {
    const int64_t first_pixel = tile * kTile;
    __syncthreads();  // the previous tile's last reads of the pixel coordinates and the slab are done
    set_pixel_tile(sm.tile, shape, first_pixel);
    __syncthreads();
    // -- stage the tile's dy and z --
    stage_slab<scalar_t, kStaging>(sm.slab, sm.tile, dy, o_first, o_count, dy_offset);
    load_rank_rows(sm.z_rows, sm.tile, z + col0, first_pixel, row_stride, gc.chunk_rank);
    __syncthreads();

    // -- dB partial: output channel `mine`, every parts-th pixel --
    for (int p = ls.part; p < kTile; p += ls.parts) {
      accumulate_ranks(acc_b, sm.slab[p][mine], &sm.z_rows[p][ls.rank_base]);
    }
    // -- u of pixel `mine` over this tile's output channels (every parts-th) --
    float acc_u[kRanksPerThread];
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) acc_u[j] = 0.f;
    for (int o = ls.part; o < o_count; o += ls.parts) {
      accumulate_ranks(acc_u, sm.slab[mine][o], &sm.weights[o][ls.rank_base]);
    }
    sum_parts(sm.scratch, acc_u, ls, mine);
    if (ls.part == 0 && sm.tile.n[mine] >= 0) {
      float* row = u_part + (static_cast<int64_t>(o_tile) * shape.pixels + first_pixel + mine) * row_stride + col0 +
                   ls.rank_base;
      store_ranks(row, 1, acc_u, ls, gc);
    }
  }

  sum_parts(sm.scratch, acc_b, ls, mine);
  if (ls.part == 0 && mine < o_count) {
    float* row = ws_b + (static_cast<int64_t>(blockIdx.y) * shape.out_channels + o_first + mine) * shape.rank +
                 gc.rank0 + ls.rank_base;
    store_ranks(row, 1, acc_b, ls, gc);
  }
}

// -- dA kernel: dA partial = u^T X for one tap and 64 input channels, one pass over x --

struct DaSmem {
  PixelTile tile;
  float slab[kTile][kTile + 1];       // x at the block's tap; +1: channel-major reads are conflict-free
  float u_rows[kTile][kMaxChunkRank];  // u of the tile's pixels, summed over the output tiles
  PartScratch scratch;
};

template <typename scalar_t, Staging kStaging>
__global__ void __launch_bounds__(kThreads)
    lowrank_da_kernel(const scalar_t* __restrict__ x,
                      const float* __restrict__ u_part,  // [o_tiles][M][groups * R]
                      float* __restrict__ ws_a,          // [splits][groups][R][taps * C_in/g]
                      const ConvShape shape, int rank_chunks, int o_tiles) {
  __shared__ DaSmem sm;
  const GroupChunk gc = group_chunk(shape, blockIdx.z, rank_chunks);
  const LaneSplit ls = lane_split(gc.chunk_rank);
  const DaColumn col = da_column(shape);
  const int my_channel = threadIdx.x % kTile;

  float acc[kRanksPerThread];
#pragma unroll
  for (int j = 0; j < kRanksPerThread; ++j) acc[j] = 0.f;
  const PixelRun run = pixel_run(shape, blockIdx.y, gridDim.y);
  for (int64_t tile = run.first; tile < run.end; ++tile) {
    stage_da_tile<scalar_t, kStaging>(sm, x, u_part, shape, gc, col, tile * kTile, o_tiles);
    // -- input channel `my_channel`, every parts-th pixel --
    for (int p = ls.part; p < kTile; p += ls.parts) {
      accumulate_ranks(acc, sm.slab[p][my_channel], &sm.u_rows[p][ls.rank_base]);
    }
    __syncthreads();
  }

  sum_parts(sm.scratch, acc, ls, my_channel);
  if (ls.part == 0 && my_channel < col.count) {
    const int64_t k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
    store_ranks(da_partial(ws_a, shape, gc, col) + ls.rank_base * k_len + my_channel, k_len, acc, ls, gc);
  }
}

}  // namespace lowrank
}  // namespace adaptsr
