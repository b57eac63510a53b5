// Host side of the low-rank gradient pass: input checks, the fp32 adapter matrices, the buffers
// and the three launches; the math and the kernels are in lora_lowrank_grads_kernel.cuh.

// Light headers (ATen/core/Tensor.h and the few ops used, c10's CUDA stream and guard; not
// ATen/ATen.h or ATen/cuda/CUDAContext.h): they cut the compile time of each file by a third.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../launch.cuh"
#include "../ops.h"
#include "lora_lowrank_grads_geometry.h"
#include "lora_lowrank_grads_kernel.cuh"
#include "lora_lowrank_grads_tc_kernel.cuh"

namespace adaptsr {

std::tuple<at::Tensor, at::Tensor> lora_lowrank_grads(const at::Tensor& x, const at::Tensor& dy,
                                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                      double scaling, std::vector<int64_t> stride,
                                                      std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                                      int64_t groups, bool allow_tf32) {
  using namespace lowrank;  // tile sizes, ConvShape, the launch geometry and the kernel
  constexpr const char* op = "lora_lowrank_grads";
  // -- checks: devices and dtypes first, then shapes --
  ADAPTSR_CHECK_KERNEL_INPUT(op, x);
  ADAPTSR_CHECK_CUDA(op, dy);
  ADAPTSR_CHECK_CUDA(op, lora_A);
  ADAPTSR_CHECK_CUDA(op, lora_B);
  ADAPTSR_CHECK_SAME_DEVICE(op, dy, x);
  ADAPTSR_CHECK_SAME_DEVICE(op, lora_A, x);
  ADAPTSR_CHECK_SAME_DEVICE(op, lora_B, x);
  ADAPTSR_CHECK_SAME_DTYPE(op, dy, x);
  ADAPTSR_CHECK_DIM(op, x, 4);
  ADAPTSR_CHECK_DIM(op, dy, 4);
  ADAPTSR_CHECK_DIM(op, lora_A, 4);
  ADAPTSR_CHECK_DIM(op, lora_B, 4);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must be pairs");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                        padding[1] >= 0,
                    op, ": stride and dilation must be >= 1 and padding >= 0, got stride ", at::IntArrayRef(stride),
                    ", padding ", at::IntArrayRef(padding), ", dilation ", at::IntArrayRef(dilation));
  TORCH_CHECK_VALUE(groups >= 1 && groups <= 65535, op, ": groups must be in [1, 65535], got ", groups);

  const int64_t n = x.size(0), in_channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_channels = dy.size(1), out_height = dy.size(2), out_width = dy.size(3);
  const int64_t rank = lora_A.size(0), in_pg = lora_A.size(1), kh = lora_A.size(2), kw = lora_A.size(3);
  TORCH_CHECK_VALUE(dy.size(0) == n && in_channels == in_pg * groups && out_channels % groups == 0, op,
                    ": inconsistent shapes x ", x.sizes(), ", dy ", dy.sizes(), ", lora_A ", lora_A.sizes(),
                    ", groups ", groups);
  ADAPTSR_CHECK_SHAPE(op, lora_B, {out_channels, rank, 1, 1});
  const int64_t expect_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t expect_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(out_height == expect_h && out_width == expect_w, op, ": dy of shape ", dy.sizes(),
                    " does not match the convolution of x ", x.sizes(), " (expected ", expect_h, " x ", expect_w,
                    " output pixels)");
  TORCH_CHECK_VALUE(height < INT32_MAX && width < INT32_MAX && n * out_height * out_width < INT32_MAX &&
                        out_channels < INT32_MAX,
                    op, ": x or dy is too large for 32-bit coordinates (at most 2^31 - 1 output pixels)");

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t taps = kh * kw;
  const int64_t k_len = taps * in_pg;
  // A as a matrix in the (tap, channel) column order the kernel walks, B as [C_out, r]; fp32.
  const at::Tensor a_mat = lora_A.permute({0, 2, 3, 1}).reshape({rank, k_len}).to(at::kFloat).contiguous();
  const at::Tensor b_mat = lora_B.reshape({out_channels, rank}).to(at::kFloat).contiguous();

  const int64_t pixels = n * out_height * out_width;
  if (pixels == 0 || rank == 0) {
    return {at::zeros(lora_A.sizes(), lora_A.options()), at::zeros(lora_B.sizes(), lora_B.options())};
  }

  const ConvShape shape = make_conv_shape(x.sizes().data(), x.strides().data(), dy.sizes().data(),
                                          dy.strides().data(), lora_A.sizes().data(), stride.data(), padding.data(),
                                          dilation.data(), groups);
  const Staging x_staging = staging_of(reinterpret_cast<std::uintptr_t>(x.data_ptr()), x.sizes().data(),
                                       x.strides().data(), groups, x.element_size());
  const Staging dy_staging = staging_of(reinterpret_cast<std::uintptr_t>(dy.data_ptr()), dy.sizes().data(),
                                        dy.strides().data(), groups, dy.element_size());
  const Launch launch = plan_launch(shape, multiprocessor_count(x));
  TORCH_CHECK_VALUE(launch.z_grid.y <= 65535, op, ": groups x ceil(rank / ", kMaxChunkRank, ") = ", launch.z_grid.y,
                    " is too large (at most 65535)");
  // Every entry of these is written by exactly one block: no zero fill.
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor z = at::empty(launch.z_sizes, f32);
  at::Tensor u_part = at::empty(launch.u_sizes, f32);
  at::Tensor ws_b = at::empty(launch.ws_b_sizes, f32);
  at::Tensor ws_a = at::empty(launch.ws_a_sizes, f32);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int rank_chunks = static_cast<int>(launch.rank_chunks);
  const int o_tiles = static_cast<int>(launch.o_tiles);
  // On sm_80 and later the z and dA kernels run on tensor cores: fp16 / bf16 always, fp32 in TF32
  // where the caller allows it (torch's own setting for the layer: cuDNN's for convs, cuBLAS's for
  // linear layers), else on CUDA cores in IEEE fp32.
  const bool tensor_cores =
      has_tensor_cores(compute_capability_major(x)) && (x.scalar_type() != at::kFloat || allow_tf32);
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // -- z from x --
    with_staging(x_staging, [&](auto staging) {
      if (tensor_cores) {
        lowrank_z_tc_kernel<scalar_t, staging.value><<<to_dim3(launch.z_grid), kThreads, 0, stream>>>(
            xp, a_mat.data_ptr<float>(), z.data_ptr<float>(), shape, rank_chunks);
        return;
      }
      lowrank_z_kernel<scalar_t, staging.value><<<to_dim3(launch.z_grid), kThreads, 0, stream>>>(
          xp, a_mat.data_ptr<float>(), z.data_ptr<float>(), shape, rank_chunks);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // -- u and dB from dy --
    with_staging(dy_staging, [&](auto staging) {
      lowrank_u_db_kernel<scalar_t, staging.value><<<to_dim3(launch.u_db_grid), kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), b_mat.data_ptr<float>(), z.data_ptr<float>(), u_part.data_ptr<float>(),
          ws_b.data_ptr<float>(), shape, rank_chunks);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // -- dA from x --
    with_staging(x_staging, [&](auto staging) {
      if (tensor_cores) {
        lowrank_da_tc_kernel<scalar_t, staging.value><<<to_dim3(launch.da_grid), kThreads, 0, stream>>>(
            xp, u_part.data_ptr<float>(), ws_a.data_ptr<float>(), shape, rank_chunks, o_tiles);
        return;
      }
      lowrank_da_kernel<scalar_t, staging.value><<<to_dim3(launch.da_grid), kThreads, 0, stream>>>(
          xp, u_part.data_ptr<float>(), ws_a.data_ptr<float>(), shape, rank_chunks, o_tiles);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // -- fixed-order sums over pixel runs (and groups: A is shared by every group), then A's layout --
  const at::Tensor grad_a_mat = sum_partials(ws_a.view({launch.da_splits * groups, rank, k_len}), scaling);
  const at::Tensor grad_a = grad_a_mat.view({rank, kh, kw, in_pg}).permute({0, 3, 1, 2}).to(lora_A.scalar_type()).contiguous();
  const at::Tensor grad_b = sum_partials(ws_b, scaling).view({out_channels, rank, 1, 1}).to(lora_B.scalar_type());
  return {grad_a, grad_b};
}

}  // namespace adaptsr
