// Dtype dispatch and input checks shared by every op of adaptsr._C.
//
// The checks run on the host before any launch, so a wrong argument (a CPU tensor, a float64
// tensor, a strided view, a wrong shape) is a readable Python exception naming the op and the
// argument, never a CUDA error or a silent wrong answer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// Runs the lambda __VA_ARGS__ with `scalar_t` bound to float, at::Half or at::BFloat16.
// Unlike AT_DISPATCH_FLOATING_TYPES_AND2 it leaves out double: the kernels accumulate in fp32,
// which would silently lose precision for float64 inputs (the Python side sends those elsewhere).
#define ADAPTSR_DISPATCH_FLOAT_HALF_BF16(DTYPE, OP_NAME, ...)                                      \
  [&] {                                                                                          \
    switch (DTYPE) {                                                                             \
      case at::ScalarType::Float: {                                                              \
        using scalar_t = float;                                                                  \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::ScalarType::Half: {                                                               \
        using scalar_t = at::Half;                                                               \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::ScalarType::BFloat16: {                                                           \
        using scalar_t = at::BFloat16;                                                           \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      default:                                                                                   \
        TORCH_CHECK_TYPE(false, OP_NAME, ": unsupported dtype ", DTYPE,                          \
                         " (the CUDA kernels take float32, float16 or bfloat16)");               \
    }                                                                                            \
  }()

// -- input checks: each names the op and the argument (the C++ variable name) --

// Device first: a CPU tensor must fail here, before any other check touches its data.
#define ADAPTSR_CHECK_CUDA(OP_NAME, T)                                                           \
  TORCH_CHECK((T).is_cuda(), OP_NAME, ": ", #T, " must be a CUDA tensor, got a tensor on ",      \
              (T).device(), " (move the model and inputs to the GPU, or select another backend)")

#define ADAPTSR_CHECK_SAME_DEVICE(OP_NAME, T, REF)                                               \
  TORCH_CHECK((T).device() == (REF).device(), OP_NAME, ": ", #T, " is on ", (T).device(),        \
              " but ", #REF, " is on ", (REF).device(), "; every tensor must be on one GPU")

#define ADAPTSR_CHECK_DTYPE(OP_NAME, T, DTYPE)                                                   \
  TORCH_CHECK_TYPE((T).scalar_type() == (DTYPE), OP_NAME, ": ", #T, " must be ", (DTYPE),        \
                   ", got ", (T).scalar_type())

#define ADAPTSR_CHECK_SAME_DTYPE(OP_NAME, T, REF)                                                \
  TORCH_CHECK_TYPE((T).scalar_type() == (REF).scalar_type(), OP_NAME, ": ", #T, " is ",          \
                   (T).scalar_type(), " but ", #REF, " is ", (REF).scalar_type(),                \
                   "; they must share one dtype")

#define ADAPTSR_CHECK_CONTIGUOUS(OP_NAME, T)                                                     \
  TORCH_CHECK_VALUE((T).is_contiguous(), OP_NAME, ": ", #T, " of shape ", (T).sizes(),           \
                    " must be contiguous (call .contiguous() on it first)")

#define ADAPTSR_CHECK_DIM(OP_NAME, T, NDIM)                                                      \
  TORCH_CHECK_VALUE((T).dim() == (NDIM), OP_NAME, ": ", #T, " must be ", NDIM,                   \
                    "-D, got shape ", (T).sizes())

// Exact shape, e.g. ADAPTSR_CHECK_SHAPE("op", bias, {heads, n, n}).
#define ADAPTSR_CHECK_SHAPE(OP_NAME, T, ...)                                                     \
  TORCH_CHECK_VALUE((T).sizes() == at::IntArrayRef(__VA_ARGS__), OP_NAME, ": ", #T,              \
                    " must have shape ", at::IntArrayRef(__VA_ARGS__), ", got ", (T).sizes())

// Device, then dtype in {float32, float16, bfloat16}: the checks every kernel input gets first.
#define ADAPTSR_CHECK_KERNEL_INPUT(OP_NAME, T)                                                   \
  do {                                                                                           \
    ADAPTSR_CHECK_CUDA(OP_NAME, T);                                                              \
    TORCH_CHECK_TYPE((T).scalar_type() == at::kFloat || (T).scalar_type() == at::kHalf ||        \
                         (T).scalar_type() == at::kBFloat16,                                     \
                     OP_NAME, ": ", #T, " must be float32, float16 or bfloat16, got ",           \
                     (T).scalar_type());                                                         \
  } while (0)
