// Launch geometry of the low-rank gradient pass: the kernels' ConvShape argument, their grids
// and buffers, from plain sizes and strides. Host-only C++ (no CUDA runtime calls, no
// ATen) shared by lora_lowrank_grads.cu and the CPU emulation test (tests/cuda_emulation/), so
// both launch the kernel the same way. The tile sizes come from the kernel header.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "../geometry.h"
#include "lora_lowrank_grads_kernel.cuh"

namespace adaptsr {
namespace lowrank {

// Whether the kernels may stage a tensor [N, C, H, W] `bytes` (16 or 8) at a time
// (Staging::kChannelVectors16 / 8): channels at unit stride, every stride of a dimension longer
// than 1 a multiple of the vector's elements, each group's first channel on a vector boundary, and
// an aligned base; then every run of channels a block reads (from a multiple of 64 within its
// group) starts aligned.
inline bool vector_loads(std::uintptr_t base, const int64_t* sizes, const int64_t* strides, int64_t groups,
                         int64_t element_size, int64_t bytes) {
  const int64_t vec = bytes / element_size;
  if (vec < 2 || strides[1] != 1 || base % bytes != 0 || (groups > 1 && (sizes[1] / groups) % vec != 0)) return false;
  for (int d : {0, 2, 3}) {
    if (sizes[d] > 1 && strides[d] % vec != 0) return false;
  }
  return true;
}

// x [N, C_in, H, W] and dy [N, C_out, HO, WO] with their strides (any layout), lora_A's sizes
// [r, C_in/g, kh, kw], and the stride, padding and dilation pairs. The caller has checked that
// the shapes agree and fit 32-bit coordinates.
inline ConvShape make_conv_shape(const int64_t* x_sizes, const int64_t* x_strides, const int64_t* dy_sizes,
                                 const int64_t* dy_strides, const int64_t* a_sizes, const int64_t* stride,
                                 const int64_t* padding, const int64_t* dilation, int64_t groups) {
  ConvShape shape;
  shape.pixels = dy_sizes[0] * dy_sizes[2] * dy_sizes[3];
  shape.height = static_cast<int>(x_sizes[2]);
  shape.width = static_cast<int>(x_sizes[3]);
  shape.out_height = static_cast<int>(dy_sizes[2]);
  shape.out_width = static_cast<int>(dy_sizes[3]);
  shape.groups = static_cast<int>(groups);
  shape.in_per_group = static_cast<int>(a_sizes[1]);
  shape.out_per_group = static_cast<int>(dy_sizes[1] / groups);
  shape.out_channels = static_cast<int>(dy_sizes[1]);
  shape.rank = static_cast<int>(a_sizes[0]);
  shape.taps = static_cast<int>(a_sizes[2] * a_sizes[3]);
  shape.kernel_w = static_cast<int>(a_sizes[3]);
  shape.stride_h = static_cast<int>(stride[0]);
  shape.stride_w = static_cast<int>(stride[1]);
  shape.pad_h = static_cast<int>(padding[0]);
  shape.pad_w = static_cast<int>(padding[1]);
  shape.dil_h = static_cast<int>(dilation[0]);
  shape.dil_w = static_cast<int>(dilation[1]);
  shape.x_sn = x_strides[0];
  shape.x_sc = x_strides[1];
  shape.x_sh = x_strides[2];
  shape.x_sw = x_strides[3];
  shape.dy_sn = dy_strides[0];
  shape.dy_sc = dy_strides[1];
  shape.dy_sh = dy_strides[2];
  shape.dy_sw = dy_strides[3];
  return shape;
}

// The kernels' Staging for a tensor [N, C, H, W] with these sizes, strides, data pointer and
// element size, in a convolution of `groups` groups.
inline Staging staging_of(std::uintptr_t base, const int64_t* sizes, const int64_t* strides, int64_t groups,
                          int64_t element_size) {
  if (strides[1] != 1) return Staging::kPixelRuns;
  if (vector_loads(base, sizes, strides, groups, element_size, 16)) return Staging::kChannelVectors16;
  if (vector_loads(base, sizes, strides, groups, element_size, 8)) return Staging::kChannelVectors8;
  return Staging::kChannelRuns;
}

// f(std::integral_constant<Staging, staging>{}): a run-time Staging as the kernels' template argument.
template <typename F>
void with_staging(Staging staging, F&& f) {
  switch (staging) {
    case Staging::kPixelRuns:
      return f(std::integral_constant<Staging, Staging::kPixelRuns>{});
    case Staging::kChannelRuns:
      return f(std::integral_constant<Staging, Staging::kChannelRuns>{});
    case Staging::kChannelVectors8:
      return f(std::integral_constant<Staging, Staging::kChannelVectors8>{});
    case Staging::kChannelVectors16:
      return f(std::integral_constant<Staging, Staging::kChannelVectors16>{});
  }
}

// Grids and float32 buffers of the three kernels (lora_lowrank_grads_kernel.cuh), blocks of kThreads.
struct Launch {
  int64_t rank_chunks;  // ceil(r / kMaxChunkRank)
  int64_t o_tiles;      // ceil(C_out/g / kTile): the u/dB kernel's column tiles
  int64_t c_tiles;      // ceil(C_in/g / kTile): the dA kernel has taps * c_tiles column tiles
  int64_t k_len;        // taps * C_in/g: columns of A's matrix
  int64_t db_splits, da_splits;  // pixel runs of the two split-K kernels
  LaunchGrid z_grid;     // (pixel tiles, groups * rank chunks)
  LaunchGrid u_db_grid;  // (o_tiles, db_splits, groups * rank chunks)
  LaunchGrid da_grid;    // (taps * c_tiles, da_splits, groups * rank chunks)
  std::array<int64_t, 2> z_sizes;     // [M, g r]
  std::array<int64_t, 3> u_sizes;     // [o_tiles, M, g r]: u's partial sum per output tile
  std::array<int64_t, 3> ws_b_sizes;  // [db_splits, C_out, r]: partial dB per pixel run
  std::array<int64_t, 4> ws_a_sizes;  // [da_splits, groups, r, k_len]: partial dA per pixel run
};

// Pixel runs for a split-K grid with `columns` blocks per run: a few blocks per SM (kBlocksPerSM)
// in all, never more runs than pixel tiles, and no empty run.
inline int64_t pixel_splits(int64_t num_tiles, int64_t columns, int64_t multiprocessors) {
  const int64_t wanted = std::clamp<int64_t>(ceil_div(multiprocessors * kBlocksPerSM, columns), 1, num_tiles);
  return ceil_div(num_tiles, ceil_div(num_tiles, wanted));
}

// The launches for a shape with at least one pixel and one rank, on a GPU with `multiprocessors` SMs.
inline Launch plan_launch(const ConvShape& shape, int64_t multiprocessors) {
  Launch launch;
  const int64_t num_tiles = ceil_div(shape.pixels, kTile);
  const int64_t groups = shape.groups;
  launch.rank_chunks = ceil_div(shape.rank, kMaxChunkRank);
  launch.o_tiles = ceil_div(shape.out_per_group, kTile);
  launch.c_tiles = ceil_div(shape.in_per_group, kTile);
  launch.k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
  const int64_t chunks = groups * launch.rank_chunks;
  const int64_t da_columns = shape.taps * launch.c_tiles;
  launch.db_splits = pixel_splits(num_tiles, launch.o_tiles * chunks, multiprocessors);
  launch.da_splits = pixel_splits(num_tiles, da_columns * chunks, multiprocessors);
  launch.z_grid = LaunchGrid{num_tiles, chunks, 1};
  launch.u_db_grid = LaunchGrid{launch.o_tiles, launch.db_splits, chunks};
  launch.da_grid = LaunchGrid{da_columns, launch.da_splits, chunks};
  const int64_t row = groups * shape.rank;
  launch.z_sizes = {shape.pixels, row};
  launch.u_sizes = {launch.o_tiles, shape.pixels, row};
  launch.ws_b_sizes = {launch.db_splits, shape.out_channels, shape.rank};
  launch.ws_a_sizes = {launch.da_splits, groups, shape.rank, launch.k_len};
  return launch;
}

}  // namespace lowrank
}  // namespace adaptsr
