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

namespace adaptsr {

// Blocks the dq kernel aims at when it reduces dbias over windows: enough to fill the GPU a few
// times over; each split adds one [heads, N, N] fp32 partial to the workspace.
constexpr int kDqBlocksPerSM = 4;

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
    if (need_dbias) grad_bias = at::zeros({dims.heads, dims.seq, dims.seq}, f32);
    return {grad_q, grad_k, grad_v, grad_bias};
  }
  TORCH_CHECK_VALUE(dims.windows <= INT32_MAX, op, ": too many windows (", dims.windows, ")");

  const int64_t rows = dims.windows * dims.heads * dims.seq;
  at::Tensor delta = at::empty({rows}, f32);
  const int64_t q_tiles = ceil_div(dims.seq, wa::kDqBlockQ);
  // Without dbias every window gets its own block; with it, a few blocks per SM, each summing
  // the dS of its windows so the partials stay few.
  int64_t splits = dims.windows;
  if (need_dbias) {
    const int64_t wanted = ceil_div(multiprocessor_count(q) * kDqBlocksPerSM, dims.heads * q_tiles);
    splits = std::clamp<int64_t>(wanted, 1, dims.windows);
  }
  at::Tensor dbias_parts;
  if (need_dbias) dbias_parts = at::empty({splits, dims.heads, dims.seq, dims.seq}, f32);

  const int heads = static_cast<int>(dims.heads), n = static_cast<int>(dims.seq), d = static_cast<int>(dims.head_dim);
  const int num_masks = static_cast<int>(std::max<int64_t>(dims.num_masks, 1));
  const float scale_f = static_cast<float>(scale);
  const float* bias_ptr = wa::optional_ptr(bias);
  const float* mask_ptr = wa::optional_ptr(mask);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    wa::attention_delta_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows, wa::kWarps)), wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), delta.data_ptr<float>(), rows, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const dim3 dq_grid(static_cast<unsigned>(splits), static_cast<unsigned>(heads), static_cast<unsigned>(q_tiles));
    wa::window_attention_dq_kernel<scalar_t><<<dq_grid, wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), bias_ptr, mask_ptr, grad_q.data_ptr<scalar_t>(),
        need_dbias ? dbias_parts.data_ptr<float>() : nullptr, dims.windows, heads, n, d, num_masks, scale_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const dim3 kv_grid(static_cast<unsigned>(dims.windows), static_cast<unsigned>(heads),
                       static_cast<unsigned>(ceil_div(dims.seq, wa::kKvBlockK)));
    wa::window_attention_dkdv_kernel<scalar_t><<<kv_grid, wa::kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), bias_ptr, mask_ptr, grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), heads, n, d, num_masks, scale_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_dbias) grad_bias = sum_partials(dbias_parts, 1.0);
  return {grad_q, grad_k, grad_v, grad_bias};
}

}  // namespace adaptsr
