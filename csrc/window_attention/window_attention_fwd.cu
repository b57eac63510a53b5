// Host side of the window-attention forward: input checks, allocation and the launch; the math
// and the kernels are in window_attention_fwd_kernel.cuh.

// Light headers (ATen/core/Tensor.h and the few ops used, c10's CUDA stream and guard; not
// ATen/ATen.h or ATen/cuda/CUDAContext.h): they cut the compile time of each file by a third.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
#include "window_attention_fwd_kernel.cuh"
#include "window_attention_geometry.h"
#include "window_attention_tc_kernel.cuh"

namespace adaptsr {

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& mask, double scale) {
  namespace wa = window_attention;
  constexpr const char* op = "window_attention_fwd";
  const wa::Dims dims = wa::check_qkv(op, q, k, v, bias, mask);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({dims.windows, dims.heads, dims.seq}, q.options().dtype(at::kFloat));
  if (dims.windows == 0 || dims.heads == 0) return {out, lse};
  TORCH_CHECK_VALUE(dims.windows <= INT32_MAX, op, ": too many windows (", dims.windows, ")");

  // fp16 and bf16 on sm_80 and later run on tensor cores; fp32 (and older GPUs) on CUDA cores.
  const bool tensor_cores = q.scalar_type() != at::kFloat && has_tensor_cores(compute_capability_major(q));
  wa::check_keys(op, dims, tensor_cores, false);
  const dim3 grid = to_dim3(wa::fwd_grid(dims.windows, dims.heads, dims.seq, tensor_cores));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int heads = static_cast<int>(dims.heads), n = static_cast<int>(dims.seq), d = static_cast<int>(dims.head_dim);
  const int n_keys = static_cast<int>(dims.keys);
  const int num_masks = wa::mask_planes(dims.num_masks);
  const float scale_f = static_cast<float>(scale);
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    wa::attention_kernels<scalar_t>(tensor_cores).fwd<<<grid, wa::kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), wa::optional_ptr(bias),
        wa::optional_ptr(mask), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), heads, n, n_keys, d, num_masks,
        scale_f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace adaptsr
