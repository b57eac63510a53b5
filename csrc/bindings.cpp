// Python bindings of adaptsr._C. adaptsr/_cuda.py wraps these with the Python-side contract of
// the Triton launchers; call them through it.
//
// torch/csrc/utils/pybind.h (pybind11 with torch's Tensor, optional and container casters) rather
// than torch/extension.h: the same bindings, a fifth of the header parsing.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"
#include "window_attention/window_attention_limits.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaptsr CUDA kernels: the LoRA low-rank gradient pass and Swin window attention";
  m.def("lora_lowrank_grads", &adaptsr::lora_lowrank_grads,
        "(dA, dB) of a LoRA conv from x (pre-padded), dy, lora_A, lora_B, scaling, stride, padding, dilation, groups; "
        "allow_tf32: fp32 products in TF32 on tensor cores",
        py::arg("x"), py::arg("dy"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("allow_tf32"));
  m.def("window_attention_fwd", &adaptsr::window_attention_fwd,
        "(o, lse) of softmax(scale q k^T + bias + mask) v over windows [B_, heads, N, d]", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("mask"), py::arg("scale"));
  m.def("window_attention_bwd", &adaptsr::window_attention_bwd,
        "(dq, dk, dv, dbias or None) of window attention from do, q, k, v, o, lse", py::arg("do"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("bias"), py::arg("mask"), py::arg("scale"),
        py::arg("need_dbias"));
  m.attr("window_attention_max_seq") = adaptsr::window_attention::kMaxSeq;
  m.attr("window_attention_max_head_dim") = adaptsr::window_attention::kMaxHeadDim;
}
