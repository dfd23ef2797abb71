// GroupNorm with an optional per-sample FiLM and an optional SiLU on contiguous float32 buffers (no torch: the
// build needs only a compiler):
//   y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift),   act = SiLU or the identity.
#pragma once
#include <cstdint>

namespace rdp_core {

// x, y, grad_y, grad_x: (n, channels, spatial) contiguous, or (n, spatial, channels) contiguous when
// channels_last (torch's channels_last memory of an NCHW tensor, read in place); weight, bias: (channels) or
// nullptr for the identity affine; scale, shift: (n, channels) or nullptr (guided-diffusion's scale-shift
// norm); mean, rstd: (n, groups). Needs channels a multiple of groups and spatial >= 1: every group must be
// non-empty.
struct GroupNormArgs {
  const float* x;
  const float* weight;
  const float* bias;
  const float* scale;
  const float* shift;
  int64_t n, channels, spatial, groups;
  bool silu;
  bool channels_last;
};

// Writes y and the per-group mean and 1/std (kept for the backward pass).
void group_norm_act_forward(const GroupNormArgs& args, double eps, float* y, float* mean, float* rstd);

// The vector-Jacobian product with grad_y, given the forward's mean and rstd. grad_x is always written; each
// parameter gradient only where its pointer is non-null (frozen weights cost nothing). grad_weight and
// grad_bias are (channels), grad_scale and grad_shift (n, channels).
void group_norm_act_backward(const GroupNormArgs& args, const float* mean, const float* rstd, const float* grad_y,
                             float* grad_x, float* grad_weight, float* grad_bias, float* grad_scale,
                             float* grad_shift);

}  // namespace rdp_core
