// Tensor-core matrix products through nvcuda::wmma with fp32 accumulation: 16 x 16 x 16 tiles of
// fp16 or bf16 for 16-bit inputs, and for fp32 inputs 16 x 16 x 8 tiles of TF32 (fp32 loaded from
// memory, its mantissa rounded to 10 bits in the fragment), which the host takes only where torch
// would (its allow_tf32 settings). bf16 and TF32 tiles need sm_80, so the bodies of these kernels
// compile only there (ADAPTSR_TENSOR_CORES) and the host launches them only on such GPUs
// (`has_tensor_cores`); the CPU emulation (tests/cuda_emulation/emu.h) provides the same API.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ADAPTSR_TENSOR_CORES 1
#else
#define ADAPTSR_TENSOR_CORES 0
#endif

namespace adaptsr {

namespace wmma = nvcuda::wmma;

constexpr int kMma = 16;  // m = n = k of one tensor-core tile

// Each input type's tensor-core tile: `element` is the WMMA fragment type, kDepth the tile's k.
// Shared-memory tiles hold x's own type (16-bit ones are handed to load_matrix_sync through a
// pointer cast, as PyTorch's own kernels do; fp32 ones as they are).
template <typename scalar_t>
struct TensorCoreTile;
template <>
struct TensorCoreTile<c10::Half> {
  using element = __half;
  static constexpr int kDepth = 16;
};
template <>
struct TensorCoreTile<c10::BFloat16> {
  using element = __nv_bfloat16;
  static constexpr int kDepth = 16;
};
template <>
struct TensorCoreTile<float> {
#if ADAPTSR_TENSOR_CORES
  using element = wmma::precision::tf32;  // declared by mma.h for sm_80 and later only
#else
  using element = float;
#endif
  static constexpr int kDepth = 8;
};

// The pointer load_matrix_sync takes for a shared-memory tile of scalar_t: the same bits as the
// WMMA type for 16-bit types; fp32 itself for TF32 fragments.
template <typename scalar_t>
__device__ __forceinline__ const auto* as_tensor_core(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    return reinterpret_cast<const typename TensorCoreTile<scalar_t>::element*>(p);
  }
}

#if ADAPTSR_TENSOR_CORES
// An operand fragment of shape [kMma x kDepth] (matrix_a) or [kDepth x kMma] (matrix_b).
template <typename Use, typename scalar_t, typename Layout>
using OperandFragment =
    wmma::fragment<Use, kMma, kMma, TensorCoreTile<scalar_t>::kDepth, typename TensorCoreTile<scalar_t>::element, Layout>;
template <typename scalar_t>
using AccumulatorFragment = wmma::fragment<wmma::accumulator, kMma, kMma, TensorCoreTile<scalar_t>::kDepth, float>;

// load_matrix_sync, then for TF32 the rounding the tensor cores expect of each fp32 element
// (round to nearest, 10-bit mantissa); 16-bit operands are loaded as they are.
template <typename Use, typename scalar_t, typename Layout>
__device__ __forceinline__ void load_operand(OperandFragment<Use, scalar_t, Layout>& frag, const scalar_t* p,
                                             unsigned ldm) {
  wmma::load_matrix_sync(frag, as_tensor_core(p), ldm);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int i = 0; i < frag.num_elements; ++i) frag.x[i] = wmma::__float_to_tf32(frag.x[i]);
  }
}
#endif

// Whether a GPU of compute capability major.minor runs the tensor-core kernels (sm_80 and later).
inline bool has_tensor_cores(int major) { return major >= 8; }

}  // namespace adaptsr
