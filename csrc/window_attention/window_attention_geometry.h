// Launch geometry of the window-attention forward and backward: grids, the window splits of the
// dq kernel and the workspace sizes, from plain sizes. Host-only C++ (no CUDA runtime calls, no
// ATen) shared by window_attention_{fwd,bwd}.cu and the CPU emulation test (tests/cuda_emulation/),
// so both launch the kernels the same way. The tile sizes come from the kernel headers.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "../geometry.h"
#include "window_attention_bwd_kernel.cuh"
#include "window_attention_fwd_kernel.cuh"
#include "window_attention_tc_kernel.cuh"

namespace adaptsr {
namespace window_attention {

// Blocks the dq kernel aims at when it reduces dbias over windows: enough to fill the GPU a few
// times over; each split adds one [heads, N, N_k] fp32 partial to the workspace.
constexpr int kDqBlocksPerSM = 4;

// The kernels' num_masks: they read mask plane b % num_masks, and take 1 when there is no mask.
inline int mask_planes(int64_t num_masks) { return static_cast<int>(std::max<int64_t>(num_masks, 1)); }

// Forward: one block of kThreads per (window, head, tile of kBlockQ queries; kTcFwdBlockQ on
// tensor cores).
inline LaunchGrid fwd_grid(int64_t windows, int64_t heads, int64_t seq, bool tensor_cores) {
  return LaunchGrid{windows, heads, ceil_div(seq, tensor_cores ? kTcFwdBlockQ : kBlockQ)};
}

struct BwdLaunch {
  int64_t rows;          // windows * heads * N: the length of delta
  int64_t splits;        // window splits of the dq kernel (= windows without dbias)
  LaunchGrid delta;      // kernel 1: one warp per row
  LaunchGrid dq;         // kernel 2: (splits, heads, query tiles of kDqBlockQ or kTcDqBlockQ)
  LaunchGrid dkdv;       // kernel 3: (windows, heads, key tiles of kKvBlockK or kTcKvBlockK)
  std::array<int64_t, 4> dbias_parts_sizes;  // float32 [splits, heads, N, N_k] (only with dbias)
};

// Without dbias every window gets its own dq block; with it, a few blocks per SM, each summing the
// dS of its windows so the partials stay few. At least one window and one head; seq queries and keys
// keys per window. tensor_cores: the tiles of the tensor-core kernels (window_attention_tc_kernel.cuh).
inline BwdLaunch plan_bwd(int64_t windows, int64_t heads, int64_t seq, int64_t keys, bool need_dbias,
                          int64_t multiprocessors, bool tensor_cores) {
  BwdLaunch launch;
  launch.rows = windows * heads * seq;
  const int64_t q_tiles = ceil_div(seq, tensor_cores ? kTcDqBlockQ : kDqBlockQ);
  launch.splits = windows;
  if (need_dbias) {
    const int64_t wanted = ceil_div(multiprocessors * kDqBlocksPerSM, heads * q_tiles);
    launch.splits = std::clamp<int64_t>(wanted, 1, windows);
  }
  launch.delta = LaunchGrid{ceil_div(launch.rows, kWarps), 1, 1};
  launch.dq = LaunchGrid{launch.splits, heads, q_tiles};
  launch.dkdv = LaunchGrid{windows, heads, ceil_div(keys, tensor_cores ? kTcKvBlockK : kKvBlockK)};
  launch.dbias_parts_sizes = {launch.splits, heads, seq, keys};
  return launch;
}

}  // namespace window_attention
}  // namespace adaptsr
