// Host-side checks of the arguments the window-attention forward and backward share.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "../dispatch.h"
#include "window_attention.cuh"

namespace adaptsr {
namespace window_attention {

struct Dims {
  int64_t windows, heads, seq, head_dim, num_masks;  // B_, heads, N, d, nW (0 without a mask)
};

// Checks q, k, v, bias and mask (device, dtype, contiguity, shape) and returns the dimensions.
inline Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& mask_opt) {
  ADAPTSR_CHECK_KERNEL_INPUT(op, q);
  ADAPTSR_CHECK_CUDA(op, k);
  ADAPTSR_CHECK_CUDA(op, v);
  ADAPTSR_CHECK_SAME_DEVICE(op, k, q);
  ADAPTSR_CHECK_SAME_DEVICE(op, v, q);
  ADAPTSR_CHECK_SAME_DTYPE(op, k, q);
  ADAPTSR_CHECK_SAME_DTYPE(op, v, q);
  ADAPTSR_CHECK_DIM(op, q, 4);
  ADAPTSR_CHECK_SHAPE(op, k, q.sizes());
  ADAPTSR_CHECK_SHAPE(op, v, q.sizes());
  ADAPTSR_CHECK_CONTIGUOUS(op, q);
  ADAPTSR_CHECK_CONTIGUOUS(op, k);
  ADAPTSR_CHECK_CONTIGUOUS(op, v);
  Dims dims{q.size(0), q.size(1), q.size(2), q.size(3), 0};
  TORCH_CHECK_VALUE(dims.seq >= 1 && dims.seq <= kMaxSeq, op, ": the window length N = q.size(2) must be in [1, ",
                    kMaxSeq, "], got q of shape ", q.sizes());
  TORCH_CHECK_VALUE(dims.head_dim >= 1 && dims.head_dim <= kMaxHeadDim, op,
                    ": the head dimension d = q.size(3) must be in [1, ", kMaxHeadDim, "], got q of shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(dims.heads <= 65535, op, ": at most 65535 heads, got q of shape ", q.sizes());
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    ADAPTSR_CHECK_CUDA(op, bias);
    ADAPTSR_CHECK_SAME_DEVICE(op, bias, q);
    ADAPTSR_CHECK_DTYPE(op, bias, at::kFloat);
    ADAPTSR_CHECK_SHAPE(op, bias, {dims.heads, dims.seq, dims.seq});
    ADAPTSR_CHECK_CONTIGUOUS(op, bias);
  }
  if (mask_opt.has_value()) {
    const at::Tensor& mask = *mask_opt;
    ADAPTSR_CHECK_CUDA(op, mask);
    ADAPTSR_CHECK_SAME_DEVICE(op, mask, q);
    ADAPTSR_CHECK_DTYPE(op, mask, at::kFloat);
    ADAPTSR_CHECK_DIM(op, mask, 3);
    TORCH_CHECK_VALUE(mask.size(0) >= 1, op, ": mask must hold at least one window, got shape ", mask.sizes());
    ADAPTSR_CHECK_SHAPE(op, mask, {mask.size(0), dims.seq, dims.seq});
    ADAPTSR_CHECK_CONTIGUOUS(op, mask);
    dims.num_masks = mask.size(0);
  }
  return dims;
}

inline const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace window_attention
}  // namespace adaptsr
