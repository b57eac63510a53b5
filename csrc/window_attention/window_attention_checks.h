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
  int64_t windows, heads, seq, keys, head_dim, num_masks;  // B_, heads, N, N_k, d, nW (0 without a mask)
};

// Checks q, k, v, bias and mask (device, dtype, contiguity, shape) and returns the dimensions. k and v
// may hold more or fewer keys per window than q holds queries (N_k != N); the kernels' own limit on
// N_k, which depends on the path (check_keys), is checked once the path is known.
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
  ADAPTSR_CHECK_DIM(op, k, 4);
  ADAPTSR_CHECK_SHAPE(op, k, {q.size(0), q.size(1), k.size(2), q.size(3)});
  ADAPTSR_CHECK_SHAPE(op, v, k.sizes());
  ADAPTSR_CHECK_CONTIGUOUS(op, q);
  ADAPTSR_CHECK_CONTIGUOUS(op, k);
  ADAPTSR_CHECK_CONTIGUOUS(op, v);
  Dims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0};
  TORCH_CHECK_VALUE(dims.seq >= 1 && dims.seq <= kMaxSeq, op, ": the window length N = q.size(2) must be in [1, ",
                    kMaxSeq, "], got q of shape ", q.sizes());
  TORCH_CHECK_VALUE(dims.keys >= 1 && dims.keys <= INT32_MAX / dims.seq, op,
                    ": k must hold 1 to 2^31 / N keys per window, got k of shape ", k.sizes());
  TORCH_CHECK_VALUE(dims.head_dim >= 1 && dims.head_dim <= kMaxHeadDim, op,
                    ": the head dimension d = q.size(3) must be in [1, ", kMaxHeadDim, "], got q of shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(dims.heads <= 65535, op, ": at most 65535 heads, got q of shape ", q.sizes());
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    ADAPTSR_CHECK_CUDA(op, bias);
    ADAPTSR_CHECK_SAME_DEVICE(op, bias, q);
    ADAPTSR_CHECK_DTYPE(op, bias, at::kFloat);
    ADAPTSR_CHECK_SHAPE(op, bias, {dims.heads, dims.seq, dims.keys});
    ADAPTSR_CHECK_CONTIGUOUS(op, bias);
  }
  if (mask_opt.has_value()) {
    const at::Tensor& mask = *mask_opt;
    ADAPTSR_CHECK_CUDA(op, mask);
    ADAPTSR_CHECK_SAME_DEVICE(op, mask, q);
    ADAPTSR_CHECK_DTYPE(op, mask, at::kFloat);
    ADAPTSR_CHECK_DIM(op, mask, 3);
    TORCH_CHECK_VALUE(mask.size(0) >= 1, op, ": mask must hold at least one window, got shape ", mask.sizes());
    ADAPTSR_CHECK_SHAPE(op, mask, {mask.size(0), dims.seq, dims.keys});
    ADAPTSR_CHECK_CONTIGUOUS(op, mask);
    dims.num_masks = mask.size(0);
  }
  return dims;
}

// The kernels that keep whole rows of N_k scores in shared memory take N_k <= kMaxSeq: the CUDA-core
// forward and dq kernels (tensor_cores false) and the dbias sum (need_dbias); the tensor-core kernels
// stream the keys otherwise.
inline void check_keys(const char* op, const Dims& dims, bool tensor_cores, bool need_dbias) {
  if (dims.keys <= kMaxSeq || (tensor_cores && !need_dbias)) return;
  TORCH_CHECK_VALUE(false, op, ": ", dims.keys, " keys per window; at most ", kMaxSeq, " ",
                    need_dbias ? "when the bias table needs a gradient" : "on CUDA cores (fp32, or GPUs before sm_80)",
                    "; fp16 / bf16 on sm_80 and later take more when the bias table is frozen");
}

inline const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace window_attention
}  // namespace adaptsr
