// Launch geometry of the fused low-rank gradient pass: the kernel's ConvShape argument, its grid
// and its workspaces, from plain sizes and strides. Host-only C++ (no CUDA runtime calls, no
// ATen) shared by lora_lowrank_grads.cu and the CPU emulation test (tests/cuda_emulation/), so
// both launch the kernel the same way. The tile sizes come from the kernel header.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "../geometry.h"
#include "lora_lowrank_grads_kernel.cuh"

namespace adaptsr {
namespace lowrank {

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

// The kernel's kChannelsFastest: staging is coalesced over channels when they are x's unit-stride
// dimension (channels-last images, and the linear layer), over pixels otherwise.
inline bool channels_fastest(const ConvShape& shape) { return shape.x_sc == 1; }

struct Launch {
  LaunchGrid grid;       // (splits, groups, rank chunks) blocks of kThreads threads
  int64_t splits;        // blocks per (group, rank chunk), each a strided set of pixel tiles
  int64_t rank_chunks;   // ceil(r / kMaxChunkRank)
  int64_t k_len;         // taps * C_in/g: columns of A's matrix
  std::array<int64_t, 4> ws_a_sizes;  // float32 zeros [splits, groups, r, k_len]: partial dA per block
  std::array<int64_t, 3> ws_b_sizes;  // float32 zeros [splits, C_out, r]: partial dB per block
};

// The grid and workspaces for a shape with at least one pixel and one rank, on a GPU with
// `multiprocessors` SMs: a few blocks per SM (kBlocksPerSM), never more splits than pixel tiles.
inline Launch plan_launch(const ConvShape& shape, int64_t groups, int64_t multiprocessors) {
  Launch launch;
  const int64_t num_tiles = ceil_div(shape.pixels, kTilePixels);
  launch.rank_chunks = ceil_div(shape.rank, kMaxChunkRank);
  const int64_t wanted = ceil_div(multiprocessors * kBlocksPerSM, groups * launch.rank_chunks);
  launch.splits = std::clamp<int64_t>(wanted, 1, num_tiles);
  launch.grid = LaunchGrid{launch.splits, groups, launch.rank_chunks};
  launch.k_len = static_cast<int64_t>(shape.taps) * shape.in_per_group;
  launch.ws_a_sizes = {launch.splits, groups, shape.rank, launch.k_len};
  launch.ws_b_sizes = {launch.splits, shape.out_channels, shape.rank};
  return launch;
}

}  // namespace lowrank
}  // namespace adaptsr
