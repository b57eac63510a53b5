// The sizes the window-attention kernels take, in plain C++: the kernels' tiles are sized from
// them, the host checks reject larger inputs, and the bindings export them (adaptsr._C's
// window_attention_max_seq and window_attention_max_head_dim) so that the "auto" backend sends
// larger inputs elsewhere instead of failing.
#pragma once

namespace adaptsr {
namespace window_attention {

constexpr int kMaxSeq = 256;     // tokens per window: Swin's 8 x 8 and 16 x 16 windows fit
constexpr int kMaxHeadDim = 64;  // head dimension: SwinIR's and HAT's 30 fit, padded to 32 on tensor cores

}  // namespace window_attention
}  // namespace adaptsr
