// Host entry points of adaptsr._C (one .cu per op folder defines each); bindings.cpp exposes them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace adaptsr {

// dA [r, C_in/g, kh, kw] and dB [C_out, r, 1, 1] of a LoRA convolution from x [N, C_in, H, W]
// (already padded for non-zero padding modes) and dy [N, C_out, HO, WO]; `padding` is the
// symmetric zero padding of the convolution itself; `allow_tf32`: fp32 products in TF32 on tensor
// cores (sm_80 and later), else IEEE fp32 on CUDA cores. Deterministic.
std::tuple<at::Tensor, at::Tensor> lora_lowrank_grads(const at::Tensor& x, const at::Tensor& dy,
                                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                      double scaling, std::vector<int64_t> stride,
                                                      std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                                      int64_t groups, bool allow_tf32);

// o = softmax(scale q k^T + bias[h] + mask[b % nW]) v and its row log-sum-exp, per window b and head h.
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& mask, double scale);

// dq, dk, dv and (when need_dbias) dbias = sum over windows of dS, from the forward's o and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask, double scale,
    bool need_dbias);

}  // namespace adaptsr
