// Launch arithmetic shared by every op's host code. Pure C++ (no CUDA runtime calls, no ATen):
// the .cu host code and the CPU emulation of the kernels (tests/cuda_emulation/) both include it
// through the per-op *_geometry.h headers, so the emulation launches exactly the grids the GPU gets.
#pragma once

#include <cstdint>

namespace adaptsr {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a launch along x, y, z (launch.cuh's to_dim3 turns it into a dim3).
struct LaunchGrid {
  int64_t x = 1, y = 1, z = 1;
};

}  // namespace adaptsr
