// Runs adaptsr's CUDA kernels on the CPU: the unchanged kernel headers of csrc/ compiled by g++
// on top of emu.h (see there what is emulated and what is not: memory ordering, occupancy and
// real warp scheduling are NOT checked). tests/test_cuda_kernels_emulated.py builds it with
// torch.utils.cpp_extension.load and compares the results with float64 references.
//
// Shared with the extension (not copied): the kernels, the launch geometry (grids, splits,
// workspace shapes, ConvShape: csrc/**/*_geometry.h) and the dtype dispatch (csrc/dispatch.h).
// The number of SMs the geometry sizes its splits from is an argument here.
//
// Copied from the .cu host code (the rest of it is input checks, the device guard and the stream):
//   lora_lowrank_grads.cu: the fp32 matrices of A ([r, taps * C_in/g], (tap, channel) order) and
//     B ([C_out, r]) and, after the launch, A's layout back to [r, C_in/g, kh, kw];
//   window_attention_{fwd,bwd}.cu: the allocations of o, lse, delta, dq, dk, dv and the dbias
//     partials;
//   launch.cuh's sum_partials (a fixed-order CUDA sum over the leading dimension, times alpha) is
//     replaced by torch's sum(0) * alpha: the same sum in another order.
// Outputs and buffers the kernels must write everywhere are filled with NaN before the launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "emu.h"  // first: the CUDA keywords the kernel headers use

#include "dispatch.h"
#include "lora_lowrank_grads/lora_lowrank_grads_geometry.h"
#include "lora_lowrank_grads/lora_lowrank_grads_tc_kernel.cuh"
#include "window_attention/window_attention_geometry.h"
#include "window_attention/window_attention_tc_kernel.cuh"

namespace {

using adaptsr::LaunchGrid;

Dim3 dim3_of(const LaunchGrid& g) {
  return Dim3{static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z)};
}

at::Tensor poisoned(at::Tensor t) { return t.fill_(std::nan("")); }

const float* optional_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> lowrank(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scaling, std::vector<int64_t> stride,
                                           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                           int64_t multiprocessors, bool tensor_cores) {
  using namespace adaptsr::lowrank;  // tensor_cores with fp32 x: the TF32 kernels
  const int64_t out_channels = dy.size(1);
  const int64_t rank = lora_A.size(0), in_pg = lora_A.size(1), kh = lora_A.size(2), kw = lora_A.size(3);
  const ConvShape shape = make_conv_shape(x.sizes().data(), x.strides().data(), dy.sizes().data(), dy.strides().data(),
                                          lora_A.sizes().data(), stride.data(), padding.data(), dilation.data(), groups);
  const Staging x_staging = staging_of(reinterpret_cast<std::uintptr_t>(x.data_ptr()), x.sizes().data(),
                                       x.strides().data(), groups, x.element_size());
  const Staging dy_staging = staging_of(reinterpret_cast<std::uintptr_t>(dy.data_ptr()), dy.sizes().data(),
                                        dy.strides().data(), groups, dy.element_size());
  const Launch launch = plan_launch(shape, multiprocessors);
  // -- copied: A and B as fp32 matrices --
  const at::Tensor a_mat = lora_A.permute({0, 2, 3, 1}).reshape({rank, launch.k_len}).to(at::kFloat).contiguous();
  const at::Tensor b_mat = lora_B.reshape({out_channels, rank}).to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor z = poisoned(at::empty(launch.z_sizes, f32));
  at::Tensor u_part = poisoned(at::empty(launch.u_sizes, f32));
  at::Tensor ws_b = poisoned(at::empty(launch.ws_b_sizes, f32));
  at::Tensor ws_a = poisoned(at::empty(launch.ws_a_sizes, f32));
  const int rank_chunks = static_cast<int>(launch.rank_chunks);
  const int o_tiles = static_cast<int>(launch.o_tiles);
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "emulated lora_lowrank_grads", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const float* ap = a_mat.data_ptr<float>();
    const float* bp = b_mat.data_ptr<float>();
    float* zp = z.data_ptr<float>();
    float* up = u_part.data_ptr<float>();
    float* wa = ws_a.data_ptr<float>();
    float* wb = ws_b.data_ptr<float>();
    with_staging(x_staging, [&](auto staging) {
      if (tensor_cores) {
        emu_launch(dim3_of(launch.z_grid), kThreads,
                   [=] { lowrank_z_tc_kernel<scalar_t, staging.value>(xp, ap, zp, shape, rank_chunks); });
        return;
      }
      emu_launch(dim3_of(launch.z_grid), kThreads,
                 [=] { lowrank_z_kernel<scalar_t, staging.value>(xp, ap, zp, shape, rank_chunks); });
    });
    with_staging(dy_staging, [&](auto staging) {
      emu_launch(dim3_of(launch.u_db_grid), kThreads,
                 [=] { lowrank_u_db_kernel<scalar_t, staging.value>(dyp, bp, zp, up, wb, shape, rank_chunks); });
    });
    with_staging(x_staging, [&](auto staging) {
      if (tensor_cores) {
        emu_launch(dim3_of(launch.da_grid), kThreads,
                   [=] { lowrank_da_tc_kernel<scalar_t, staging.value>(xp, up, wa, shape, rank_chunks, o_tiles); });
        return;
      }
      emu_launch(dim3_of(launch.da_grid), kThreads,
                 [=] { lowrank_da_kernel<scalar_t, staging.value>(xp, up, wa, shape, rank_chunks, o_tiles); });
    });
  });
  // -- copied: the sums over blocks (torch's sum for sum_partials) and A's layout --
  const at::Tensor grad_a_mat = ws_a.view({launch.da_splits * groups, rank, launch.k_len}).sum(0).mul(scaling);
  const at::Tensor grad_a =
      grad_a_mat.view({rank, kh, kw, in_pg}).permute({0, 3, 1, 2}).to(lora_A.scalar_type()).contiguous();
  const at::Tensor grad_b = ws_b.sum(0).mul(scaling).view({out_channels, rank, 1, 1}).to(lora_B.scalar_type());
  return {grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& mask, double scale,
                                                        bool tensor_cores) {
  namespace wa = adaptsr::window_attention;
  TORCH_CHECK(!tensor_cores || q.scalar_type() != at::kFloat, "the tensor-core kernels take 16-bit inputs");
  const int64_t windows = q.size(0), heads = q.size(1), seq = q.size(2), keys = k.size(2), d = q.size(3);
  const int num_masks = wa::mask_planes(mask.has_value() ? mask->size(0) : 0);
  at::Tensor out = poisoned(at::empty_like(q));
  at::Tensor lse = poisoned(at::empty({windows, heads, seq}, q.options().dtype(at::kFloat)));
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "emulated window_attention_fwd", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const float* bp = optional_ptr(bias);
    const float* mp = optional_ptr(mask);
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    const int h = static_cast<int>(heads), n = static_cast<int>(seq), nk = static_cast<int>(keys);
    const int dd = static_cast<int>(d);
    const float sc = static_cast<float>(scale);
    const auto kernel = wa::attention_kernels<scalar_t>(tensor_cores).fwd;
    emu_launch(dim3_of(wa::fwd_grid(windows, heads, seq, tensor_cores)), wa::kThreads,
               [=] { kernel(qp, kp, vp, bp, mp, op, lp, h, n, nk, dd, num_masks, sc); });
  });
  return {out, lse};
}

// (dq, dk, dv, delta, dbias or None)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask, double scale,
    bool need_dbias, int64_t multiprocessors, bool tensor_cores) {
  namespace wa = adaptsr::window_attention;
  TORCH_CHECK(!tensor_cores || q.scalar_type() != at::kFloat, "the tensor-core kernels take 16-bit inputs");
  const int64_t windows = q.size(0), heads = q.size(1), seq = q.size(2), keys = k.size(2), d = q.size(3);
  const int num_masks = wa::mask_planes(mask.has_value() ? mask->size(0) : 0);
  const wa::BwdLaunch launch = wa::plan_bwd(windows, heads, seq, keys, need_dbias, multiprocessors, tensor_cores);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor grad_q = poisoned(at::empty_like(q));
  at::Tensor grad_k = poisoned(at::empty_like(k));
  at::Tensor grad_v = poisoned(at::empty_like(v));
  at::Tensor delta = poisoned(at::empty({launch.rows}, f32));
  at::Tensor dbias_parts;
  if (need_dbias) dbias_parts = poisoned(at::empty(launch.dbias_parts_sizes, f32));
  ADAPTSR_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "emulated window_attention_bwd", [&] {
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    const float* lp = lse.data_ptr<float>();
    float* dp = delta.data_ptr<float>();
    const float* bp = optional_ptr(bias);
    const float* mp = optional_ptr(mask);
    scalar_t* dqp = grad_q.data_ptr<scalar_t>();
    scalar_t* dkp = grad_k.data_ptr<scalar_t>();
    scalar_t* dvp = grad_v.data_ptr<scalar_t>();
    float* dbp = need_dbias ? dbias_parts.data_ptr<float>() : nullptr;
    const int h = static_cast<int>(heads), n = static_cast<int>(seq), nk = static_cast<int>(keys);
    const int dd = static_cast<int>(d);
    const float sc = static_cast<float>(scale);
    const int64_t rows = launch.rows;
    emu_launch(dim3_of(launch.delta), wa::kThreads, [=] { wa::attention_delta_kernel<scalar_t>(gp, op, dp, rows, dd); });
    const auto kernels = wa::attention_kernels<scalar_t>(tensor_cores);
    emu_launch(dim3_of(launch.dq), wa::kThreads, [=] {
      kernels.dq(gp, qp, kp, vp, lp, dp, bp, mp, dqp, dbp, windows, h, n, nk, dd, num_masks, sc);
    });
    emu_launch(dim3_of(launch.dkdv), wa::kThreads,
               [=] { kernels.dkdv(gp, qp, kp, vp, lp, dp, bp, mp, dkp, dvp, h, n, nk, dd, num_masks, sc); });
  });
  std::optional<at::Tensor> grad_bias;
  if (need_dbias) grad_bias = dbias_parts.sum(0);  // copied: sum_partials(dbias_parts, 1.0)
  return {grad_q, grad_k, grad_v, delta, grad_bias};
}

void set_descending_schedule(bool descending) {
  emu::g_schedule = descending ? emu::Schedule::kDescending : emu::Schedule::kAscending;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaptsr's CUDA kernels run on the CPU by emulation (tests only)";
  m.def("lora_lowrank_grads", &lowrank, py::arg("x"), py::arg("dy"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("scaling"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("multiprocessors"), py::arg("tensor_cores"));
  m.def("window_attention_fwd", &window_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"),
        py::arg("mask"), py::arg("scale"), py::arg("tensor_cores"));
  m.def("window_attention_bwd", &window_attention_bwd, py::arg("do"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("lse"), py::arg("bias"), py::arg("mask"), py::arg("scale"), py::arg("need_dbias"),
        py::arg("multiprocessors"), py::arg("tensor_cores"));
  m.def("set_descending_schedule", &set_descending_schedule,
        "run the threads of a block in descending index order between barriers (default: ascending)",
        py::arg("descending"));
}
