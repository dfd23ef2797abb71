// GroupNorm followed by SiLU on contiguous float32 buffers (no torch: the build needs only a compiler).
#pragma once
#include <cstdint>

namespace rdp_core {

// x, y: (n, channels, spatial) contiguous; weight, bias: (channels) or nullptr for the identity affine;
// mean, rstd: (n, groups) outputs, kept for a backward pass. Needs channels a multiple of groups and
// spatial >= 1: every group must be non-empty.
void group_norm_silu_forward(const float* x, const float* weight, const float* bias, float* y, float* mean,
                             float* rstd, int64_t n, int64_t channels, int64_t spatial, int64_t groups,
                             double eps);

}  // namespace rdp_core
