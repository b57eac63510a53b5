// Host side of the window-attention backward: input checks, allocation and the launch; the math
// and the kernels are in window_attention_bwd_kernel.cuh.

// Light headers (ATen/core/Tensor.h and the few ops used, c10's CUDA stream and guard; not
// ATen/ATen.h or ATen/cuda/CUDAContext.h): they cut the compile time of each file by a third.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../dispatch.h"
#include "../launch.cuh"
#include "../ops.h"
#include "window_attention_checks.h"
#include "window_attention_bwd_kernel.cuh"
#include "window_attention_geometry.h"
#include "window_attention_tc_kernel.cuh"

namespace adaptsr {

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask, double scale,
    bool need_dbias) {
  namespace wa = window_attention;
  constexpr const char* op = "window_attention_bwd";
  const wa::Dims dims = wa::check_qkv(op, q, k, v, bias, mask);
  ADAPTSR_CHECK_CUDA(op, grad_out);
  ADAPTSR_CHECK_CUDA(op, out);
  ADAPTSR_CHECK_CUDA(op, lse);
  ADAPTSR_CHECK_SAME_DEVICE(op, grad_out, q);
  ADAPTSR_CHECK_SAME_DEVICE(op, out, q);
  ADAPTSR_CHECK_SAME_DEVICE(op, lse, q);
  ADAPTSR_CHECK_SAME_DTYPE(op, grad_out, q);
  ADAPTSR_CHECK_SAME_DTYPE(op, out, q);
  ADAPTSR_CHECK_DTYPE(op, lse, at::kFloat);
  ADAPTSR_CHECK_SHAPE(op, grad_out, q.sizes());
  ADAPTSR_CHECK_SHAPE(op, out, q.sizes());
  ADAPTSR_CHECK_SHAPE(op, lse, {dims.windows, dims.heads, dims.seq});
  ADAPTSR_CHECK_CONTIGUOUS(op, grad_out);
  ADAPTSR_CHECK_CONTIGUOUS(op, out);
  ADAPTSR_CHECK_CONTIGUOUS(op, lse);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  std::optional<at::Tensor> grad_bias;
  const auto f32 = q.options().dtype(at::kFloat);
  if (dims.windows == 0 || dims.heads == 0) {
    if (need_dbias) grad_bias = at::zeros({dims.heads, dims.seq, dims.keys}, f32);
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  TORCH_CHECK_VALUE(dims.windows <= INT32_MAX, op, ": too many windows (", dims.windows, ")");

  // The SM count only sizes the dbias splits: ask the GPU only when there are some.
  const int64_t multiprocessors = need_dbias ? multiprocessor_count(q) : 1;
  // fp16 and bf16 on sm_80 and later run on tensor cores; fp32 (and older GPUs) on CUDA cores.
  const bool tensor_cores = q.scalar_type() != at::kFloat && has_tensor_cores(compute_capability_major(q));
  wa::check_keys(op, dims, tensor_cores, need_dbias);
  const wa::BwdLaunch launch =
      wa::plan_bwd(dims.windows, dims.heads, dims.seq, dims.keys, need_dbias, multiprocessors, tensor_cores);
  const int64_t rows = launch.rows;
  at::Tensor delta = at::empty({rows}, f32);
  at::Tensor dbias_parts;
  if (need_dbias) dbias_parts = at::empty(launch.dbias_parts_sizes, f32);

  const int heads = static_cast<int>(dims.heads), n = static_cast<int>(dims.seq), d = static_cast<int>(dims.head_dim);
  const int n_keys = static_cast<int>(dims.keys);
  const int num_masks = wa::mask_planes(dims.num_masks);
  const float scale_f = static_cast<float>(scale);
  const float* bias_ptr = wa::optional_ptr(bias);
  const float* mask_ptr = wa::optional_ptr(mask);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    wa::attention_delta_kernel<scalar_t><<<to_dim3(launch.delta), wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), delta.data_ptr<float>(), rows, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const wa::AttentionKernels<scalar_t> kernels = wa::attention_kernels<scalar_t>(tensor_cores);
    kernels.dq<<<to_dim3(launch.dq), wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), bias_ptr, mask_ptr, grad_q.data_ptr<scalar_t>(),
        need_dbias ? dbias_parts.data_ptr<float>() : nullptr, dims.windows, heads, n, n_keys, d, num_masks, scale_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    kernels.dkdv<<<to_dim3(launch.dkdv), wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), bias_ptr, mask_ptr, grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), heads, n, n_keys, d, num_masks, scale_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_dbias) grad_bias = sum_partials(dbias_parts, 1.0);
  return {grad_q, grad_k, grad_v, grad_bias};
}

}  // namespace adaptsr
