#include "group_norm_silu.h"
#include "isa.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace rdp_core {
namespace {

// Independent partial sums: the compiler vectorizes the reductions over them, and 64 gives four AVX-512
// (eight AVX2) accumulators, enough to hide the add latency that one vector of 16 was bound by.
constexpr int kLanes = 64;
constexpr int64_t kBlock = 4096;  // float partial sums are flushed into double this often

// z * sigmoid(z); the clamp inside exp_approx keeps it finite for any z.
RDP_CORE_INLINE float silu(float z) { return z / (1.0f + exp_approx(-z)); }

// Sum of f(x[k]) in float lanes per block and double across blocks.
template <typename F>
RDP_CORE_INLINE double blocked_sum(const float* __restrict x, int64_t count, F f) {
  double total = 0.0;
  for (int64_t start = 0; start < count; start += kBlock) {
    const int64_t end = std::min(count, start + kBlock);
    float lanes[kLanes] = {0.0f};
    int64_t k = start;
    for (; k + kLanes <= end; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += f(x[k + j]);
    }
    for (; k < end; ++k) lanes[0] += f(x[k]);
    for (int j = 0; j < kLanes; ++j) total += lanes[j];
  }
  return total;
}

// Mean and E[(x - mean)^2] of one cache-resident group, in two passes. Never E[x^2] - E[x]^2: it cancels
// on large means. Both passes sum values near zero, so float lanes keep full accuracy: the first sums
// x - x[0] (a shift that is exact wherever the data sit far from zero), the second the deviations from
// the float32-rounded mean (exact for x near it, by Sterbenz's lemma), corrected for that rounding.
RDP_CORE_INLINE void group_moments(const float* __restrict x, int64_t count, double* mean, double* variance) {
  const float pivot = x[0];
  const double m = pivot + blocked_sum(x, count, [pivot](float v) { return v - pivot; }) / static_cast<double>(count);
  const float m_f = static_cast<float>(m);
  const double squares = blocked_sum(x, count, [m_f](float v) { return (v - m_f) * (v - m_f); });
  const double rounding = m - static_cast<double>(m_f);
  *mean = m;
  *variance = std::max(squares / static_cast<double>(count) - rounding * rounding, 0.0);
}

// d silu(z) / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z))).
RDP_CORE_INLINE float silu_grad(float z) {
  const float sigmoid = 1.0f / (1.0f + exp_approx(-z));
  return sigmoid * (1.0f + z * (1.0f - sigmoid));
}

// y = act((x - mean) * a + b) over one channel's spatial extent. The centring stays a separate subtraction:
// folding it into the shift (a * x + (b - mean * a)) cancels catastrophically on large means.
template <bool kSiLU>
RDP_CORE_INLINE void normalize_act(const float* __restrict x, float* __restrict y, int64_t spatial, float mean,
                                   float a, float b) {
  for (int64_t k = 0; k < spatial; ++k) {
    const float z = (x[k] - mean) * a + b;
    y[k] = kSiLU ? silu(z) : z;
  }
}

// Per-channel factors of the affine and the FiLM: z = x_hat * alpha + beta with x_hat = (x - mean) * rstd.
struct ChannelAffine {
  float alpha, beta;
};

RDP_CORE_INLINE ChannelAffine channel_affine(const GroupNormArgs& args, int64_t sample, int64_t channel) {
  const float w = args.weight ? args.weight[channel] : 1.0f;
  const float b = args.bias ? args.bias[channel] : 0.0f;
  const float gain = args.scale ? 1.0f + args.scale[sample * args.channels + channel] : 1.0f;
  const float offset = args.shift ? args.shift[sample * args.channels + channel] : 0.0f;
  return {w * gain, b * gain + offset};
}

// Normalises one group and applies affine, FiLM and activation; compiled once per instruction set and picked
// at load time (see RDP_CORE_ISA_CLONES), so a wheel built on any x86-64 uses AVX2 or AVX-512 where present.
RDP_CORE_ISA_CLONES
void forward_group(const GroupNormArgs& args, int64_t ng, double eps, float* y, float* mean, float* rstd) {
  const int64_t per_group = args.channels / args.groups, spatial = args.spatial;
  const int64_t offset = ng * per_group * spatial;
  double m = 0.0, variance = 0.0;
  group_moments(args.x + offset, per_group * spatial, &m, &variance);
  const double r = 1.0 / std::sqrt(variance + eps);
  const float m_f = static_cast<float>(m);
  mean[ng] = m_f;
  rstd[ng] = static_cast<float>(r);
  // x - float(m) is exact for x near the mean (Sterbenz); the rounding of m itself goes into the shift.
  const double rounding = m - static_cast<double>(m_f);
  const int64_t sample = ng / args.groups, first_channel = (ng % args.groups) * per_group;
  for (int64_t c = 0; c < per_group; ++c) {
    const ChannelAffine affine = channel_affine(args, sample, first_channel + c);
    const double a = r * affine.alpha;
    const float b = static_cast<float>(affine.beta - a * rounding);
    const float* xc = args.x + offset + c * spatial;
    float* yc = y + offset + c * spatial;
    if (args.silu) {
      normalize_act<true>(xc, yc, spatial, m_f, static_cast<float>(a), b);
    } else {
      normalize_act<false>(xc, yc, spatial, m_f, static_cast<float>(a), b);
    }
  }
}

// First backward pass over one channel: with SiLU, dz = grad_y * silu'(z) into `dz` (grad_x, used as scratch;
// without an activation dz is grad_y itself and nothing is stored), and the sums of dz and dz * x_hat, float
// lanes within a block and double across blocks as in blocked_sum.
template <bool kSiLU>
RDP_CORE_INLINE void channel_dz_sums(const float* __restrict x, const float* __restrict grad_y, float* __restrict dz,
                                     int64_t spatial, float mean, float rstd, ChannelAffine affine, double* sum_dz,
                                     double* sum_dz_xhat) {
  // SiLU's derivative is arithmetic-heavy: 64 lanes of it spill registers (AVX2, 8x512x8x8: 1.35x slower than 16),
  // while the light identity case needs the 64 to hide the add latency (3x slower with 16).
  constexpr int lanes = kSiLU ? 16 : kLanes;
  double total_dz = 0.0, total_dz_xhat = 0.0;
  for (int64_t start = 0; start < spatial; start += kBlock) {
    const int64_t end = std::min(spatial, start + kBlock);
    float lanes_dz[lanes] = {0.0f}, lanes_dz_xhat[lanes] = {0.0f};
    int64_t k = start;
    for (; k + lanes <= end; k += lanes) {
      for (int j = 0; j < lanes; ++j) {
        const float x_hat = (x[k + j] - mean) * rstd;
        const float d = kSiLU ? grad_y[k + j] * silu_grad(x_hat * affine.alpha + affine.beta) : grad_y[k + j];
        if (kSiLU) dz[k + j] = d;
        lanes_dz[j] += d;
        lanes_dz_xhat[j] += d * x_hat;
      }
    }
    for (; k < end; ++k) {
      const float x_hat = (x[k] - mean) * rstd;
      const float d = kSiLU ? grad_y[k] * silu_grad(x_hat * affine.alpha + affine.beta) : grad_y[k];
      if (kSiLU) dz[k] = d;
      lanes_dz[0] += d;
      lanes_dz_xhat[0] += d * x_hat;
    }
    for (int j = 0; j < lanes; ++j) {
      total_dz += lanes_dz[j];
      total_dz_xhat += lanes_dz_xhat[j];
    }
  }
  *sum_dz = total_dz;
  *sum_dz_xhat = total_dz_xhat;
}

// Second pass: grad_x = rstd * (dz * alpha - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)); dz may be grad_x.
RDP_CORE_INLINE void channel_grad_x(const float* __restrict x, const float* dz, float* grad_x, int64_t spatial,
                                    float mean, float rstd, float alpha, float m1, float m2) {
  for (int64_t k = 0; k < spatial; ++k) {
    const float x_hat = (x[k] - mean) * rstd;
    grad_x[k] = rstd * (dz[k] * alpha - m1 - x_hat * m2);
  }
}

// grad_x of one group; per-channel sums of dz and dz * x_hat into sums[2 c], sums[2 c + 1] when sums is set.
RDP_CORE_ISA_CLONES
void backward_group(const GroupNormArgs& args, int64_t ng, const float* mean, const float* rstd, const float* grad_y,
                    float* grad_x, double* sums) {
  const int64_t per_group = args.channels / args.groups, spatial = args.spatial;
  const int64_t offset = ng * per_group * spatial;
  const int64_t sample = ng / args.groups, first_channel = (ng % args.groups) * per_group;
  double m1 = 0.0, m2 = 0.0;  // sums over the group of dx_hat and dx_hat * x_hat, dx_hat = dz * alpha
  for (int64_t c = 0; c < per_group; ++c) {
    const ChannelAffine affine = channel_affine(args, sample, first_channel + c);
    const int64_t at = offset + c * spatial;
    double sum_dz = 0.0, sum_dz_xhat = 0.0;
    if (args.silu) {
      channel_dz_sums<true>(args.x + at, grad_y + at, grad_x + at, spatial, mean[ng], rstd[ng], affine, &sum_dz,
                            &sum_dz_xhat);
    } else {
      channel_dz_sums<false>(args.x + at, grad_y + at, grad_x + at, spatial, mean[ng], rstd[ng], affine, &sum_dz,
                             &sum_dz_xhat);
    }
    m1 += affine.alpha * sum_dz;
    m2 += affine.alpha * sum_dz_xhat;
    if (sums) {
      sums[2 * c] = sum_dz;
      sums[2 * c + 1] = sum_dz_xhat;
    }
  }
  const double count = static_cast<double>(per_group * spatial);
  for (int64_t c = 0; c < per_group; ++c) {
    const int64_t at = offset + c * spatial;
    const float alpha = channel_affine(args, sample, first_channel + c).alpha;
    const float* dz = args.silu ? grad_x + at : grad_y + at;
    channel_grad_x(args.x + at, dz, grad_x + at, spatial, mean[ng], rstd[ng], alpha, static_cast<float>(m1 / count),
                   static_cast<float>(m2 / count));
  }
}

// Parameter gradients from the per-(sample, channel) sums A = sum dz and B = sum dz * x_hat:
// grad_shift = A, grad_scale = weight * B + bias * A, grad_weight = sum_n (1 + scale) B, grad_bias = sum_n
// (1 + scale) A. O(n * channels): serial.
void parameter_grads(const GroupNormArgs& args, const double* sums, float* grad_weight, float* grad_bias,
                     float* grad_scale, float* grad_shift) {
  for (int64_t c = 0; c < args.channels; ++c) {
    const double w = args.weight ? args.weight[c] : 1.0, bias = args.bias ? args.bias[c] : 0.0;
    double dw = 0.0, db = 0.0;
    for (int64_t s = 0; s < args.n; ++s) {
      const int64_t i = s * args.channels + c;
      const double a = sums[2 * i], b = sums[2 * i + 1];
      const double gain = args.scale ? 1.0 + args.scale[i] : 1.0;
      dw += gain * b;
      db += gain * a;
      if (grad_shift) grad_shift[i] = static_cast<float>(a);
      if (grad_scale) {
        grad_scale[i] = static_cast<float>(w * b + bias * a);
      }
    }
    if (grad_weight) grad_weight[c] = static_cast<float>(dw);
    if (grad_bias) grad_bias[c] = static_cast<float>(db);
  }
}

}  // namespace

void group_norm_act_forward(const GroupNormArgs& args, double eps, float* y, float* mean, float* rstd) {
#ifdef _OPENMP  // without OpenMP the groups run in order on one thread
#pragma omp parallel for schedule(static)
#endif
  for (int64_t ng = 0; ng < args.n * args.groups; ++ng) {
    forward_group(args, ng, eps, y, mean, rstd);
  }
}

void group_norm_act_backward(const GroupNormArgs& args, const float* mean, const float* rstd, const float* grad_y,
                             float* grad_x, float* grad_weight, float* grad_bias, float* grad_scale,
                             float* grad_shift) {
  const bool parameters = grad_weight || grad_bias || grad_scale || grad_shift;
  std::vector<double> sums(parameters ? 2 * args.n * args.channels : 0);
  const int64_t per_group = args.channels / args.groups;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (int64_t ng = 0; ng < args.n * args.groups; ++ng) {
    backward_group(args, ng, mean, rstd, grad_y, grad_x, parameters ? sums.data() + 2 * ng * per_group : nullptr);
  }
  if (parameters) parameter_grads(args, sums.data(), grad_weight, grad_bias, grad_scale, grad_shift);
}

}  // namespace rdp_core
