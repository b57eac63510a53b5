// Tensor-core matrix products for kernels whose inputs are 16-bit: nvcuda::wmma's 16 x 16 x 16
// tiles of fp16 or bf16 with fp32 accumulation. bf16 tiles need sm_80, so the bodies of these
// kernels compile only there (ADAPTSR_TENSOR_CORES) and the host launches them only on such GPUs
// (`has_tensor_cores`); the CPU emulation (tests/cuda_emulation/emu.h) provides the same API.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ADAPTSR_TENSOR_CORES 1
#else
#define ADAPTSR_TENSOR_CORES 0
#endif

namespace adaptsr {

namespace wmma = nvcuda::wmma;

constexpr int kMma = 16;  // m = n = k of one tensor-core tile

// The WMMA element type of a 16-bit c10 type (the same bits: shared-memory tiles are kept as the
// c10 type and handed to load_matrix_sync through a pointer cast, as PyTorch's own kernels do).
template <typename scalar_t>
struct TensorCoreType;
template <>
struct TensorCoreType<c10::Half> {
  using type = __half;
};
template <>
struct TensorCoreType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
__device__ __forceinline__ const typename TensorCoreType<scalar_t>::type* as_tensor_core(const scalar_t* p) {
  return reinterpret_cast<const typename TensorCoreType<scalar_t>::type*>(p);
}

// Whether a GPU of compute capability major.minor runs the tensor-core kernels (sm_80 and later).
inline bool has_tensor_cores(int major) { return major >= 8; }

}  // namespace adaptsr
