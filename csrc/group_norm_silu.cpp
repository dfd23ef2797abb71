#include "group_norm_silu.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace rdp_core {
namespace {

// Independent partial sums: the compiler vectorizes the reductions over them, and 64 gives four AVX-512
// (eight AVX2) accumulators, enough to hide the add latency that one vector of 16 was bound by.
constexpr int kLanes = 64;
constexpr int64_t kBlock = 4096;  // float partial sums are flushed into double this often

// exp(v) for v in [-87, 88] from plain arithmetic, so that loops calling it vectorize (std::exp does
// not without -ffast-math): 2^n * e^r with |r| <= ln(2)/2 and Cephes' degree-6 polynomial for e^r.
// Relative error below 1e-7 over the whole range (checked against double exp on every float).
RDP_CORE_INLINE float exp_approx(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);  // not fmin/fmax: libm calls on baseline x86-64
  // Adding 1.5 * 2^23 rounds v / ln(2) to the nearest integer n and leaves n in the low mantissa bits:
  // two adds where a floor through int conversions costs five instructions per vector.
  const float shifted = v * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const int32_t n_int = shifted_bits - 0x4B400000;  // the bits of 1.5 * 2^23
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t bits = (n_int + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return e_r * two_n;
}

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

// y = silu((x - mean) * a + b) over one channel's spatial extent. The centring stays a separate
// subtraction: folding it into the shift (a * x + (b - mean * a)) cancels catastrophically on large means.
RDP_CORE_INLINE void normalize_silu(const float* __restrict x, float* __restrict y, int64_t spatial, float mean,
                                    float a, float b) {
  for (int64_t k = 0; k < spatial; ++k) y[k] = silu((x[k] - mean) * a + b);
}

// Normalises one group and applies the affine and SiLU; compiled once per instruction set and picked at
// load time (see RDP_CORE_ISA_CLONES), so a wheel built on any x86-64 uses AVX2 or AVX-512 where present.
RDP_CORE_ISA_CLONES
void group_norm_silu_group(const float* x, const float* weight, const float* bias, float* y, float* mean, float* rstd,
                           int64_t first_channel, int64_t per_group, int64_t spatial, double eps) {
  double m = 0.0, variance = 0.0;
  group_moments(x, per_group * spatial, &m, &variance);
  const double r = 1.0 / std::sqrt(variance + eps);
  const float m_f = static_cast<float>(m);
  *mean = m_f;
  *rstd = static_cast<float>(r);
  // x - float(m) is exact for x near the mean (Sterbenz); the rounding of m itself goes into the shift.
  const double rounding = m - static_cast<double>(m_f);
  for (int64_t c = 0; c < per_group; ++c) {
    const int64_t channel = first_channel + c;
    const double a = r * (weight ? weight[channel] : 1.0f);
    const double b = (bias ? bias[channel] : 0.0f) - a * rounding;
    normalize_silu(x + c * spatial, y + c * spatial, spatial, m_f, static_cast<float>(a), static_cast<float>(b));
  }
}

}  // namespace

void group_norm_silu_forward(const float* x, const float* weight, const float* bias, float* y, float* mean,
                             float* rstd, int64_t n, int64_t channels, int64_t spatial, int64_t groups,
                             double eps) {
  const int64_t per_group = channels / groups;
  const int64_t group_size = per_group * spatial;
#ifdef _OPENMP  // without OpenMP the groups run in order on one thread
#pragma omp parallel for schedule(static)
#endif
  for (int64_t ng = 0; ng < n * groups; ++ng) {
    group_norm_silu_group(x + ng * group_size, weight, bias, y + ng * group_size, mean + ng, rstd + ng,
                          (ng % groups) * per_group, per_group, spatial, eps);
  }
}

}  // namespace rdp_core
