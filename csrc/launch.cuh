// Host helpers shared by the ops: the GPU's size, dim3 grids and the deterministic reduction of
// per-block partials (the CUDA-free launch arithmetic is in geometry.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "geometry.h"

namespace adaptsr {

// The dim3 of a grid planned by a *_geometry.h header (each of its sizes checked by the caller).
inline dim3 to_dim3(const LaunchGrid& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

// Streaming multiprocessors of the tensor's GPU: grids that reduce into per-block partials size
// themselves from it (a few blocks per SM), so the workspace does not grow with the problem.
inline int64_t multiprocessor_count(const at::Tensor& on) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, on.get_device()));
  return count;
}

// Compute capability major version of the tensor's GPU (8 for Ampere, 9 for Hopper).
inline int compute_capability_major(const at::Tensor& on) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, on.get_device()));
  return major;
}

// out[e] = alpha * sum_{s = 0, 1, ..., S-1} parts[s][e]
//
// One thread per output entry adds the S partials in increasing s: a fixed order, so the result
// is bitwise the same on every run (no atomics anywhere). A template so that the header can be
// included by several translation units without duplicate kernel symbols.
template <typename Unused = void>
__global__ void sum_partials_kernel(const float* __restrict__ parts, float* __restrict__ out, int64_t num_parts,
                                    int64_t numel, float alpha) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += step) {
    float acc = 0.f;
    for (int64_t s = 0; s < num_parts; ++s) acc += parts[s * numel + e];
    out[e] = alpha * acc;
  }
}

// The sum over the leading dimension of a contiguous float32 tensor [S, ...], times alpha.
inline at::Tensor sum_partials(const at::Tensor& parts, double alpha) {
  TORCH_INTERNAL_ASSERT(parts.is_cuda() && parts.scalar_type() == at::kFloat && parts.is_contiguous());
  at::Tensor out = at::empty(parts.sizes().slice(1), parts.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  constexpr int kThreads = 256;
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, kThreads), 65535);
  sum_partials_kernel<><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      parts.data_ptr<float>(), out.data_ptr<float>(), parts.size(0), numel, static_cast<float>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace adaptsr
