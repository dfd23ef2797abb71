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


// ---- Channels-last layout: x is (n, spatial, channels), a group is a strided slice of every position. ----
// Work is split into chunks of positions of one sample, each small enough to stay in L1 between the passes
// that read it twice; per-chunk moments are merged per group in double (Chan et al.'s pairwise update), so
// the statistics take one pass over memory, as in the NCHW kernel.

// Positions per chunk: about 32 KiB of floats, at most 256 positions (float lanes sum at most that many).
int64_t chunk_positions(int64_t channels) { return std::clamp<int64_t>(8192 / channels, 1, 256); }

int64_t chunks_per_sample(const GroupNormArgs& args) {
  const int64_t per_chunk = chunk_positions(args.channels);
  return (args.spatial + per_chunk - 1) / per_chunk;
}

// Runs body(task, sample, p0, p1, scratch) for every chunk [p0, p1) of positions of every sample (task numbers
// them sample by sample) on the OpenMP threads, each thread with its own scratch of scratch_floats floats.
template <typename Body>
void for_each_chunk(const GroupNormArgs& args, int64_t scratch_floats, Body body) {
  const int64_t chunks = chunks_per_sample(args), per_chunk = chunk_positions(args.channels);
#ifdef _OPENMP
#pragma omp parallel
#endif
  {
    std::vector<float> scratch(scratch_floats);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t task = 0; task < args.n * chunks; ++task) {
      const int64_t sample = task / chunks, p0 = task % chunks * per_chunk;
      body(task, sample, p0, std::min(args.spatial, p0 + per_chunk), scratch.data());
    }
  }
}

// Mean and sum of squared deviations of one group over one chunk.
struct Moments {
  double mean, m2;
};

// Channels summed in registers at once: 64 floats are four AVX-512 (eight AVX2) accumulators, kept across a
// whole chunk of positions instead of a load and store of every channel's sum at every position.
constexpr int64_t kChannelBlock = 64;

// sums[c] = sum over positions [p0, p1) of f(x[p, c], c), float lanes per channel.
template <typename F>
RDP_CORE_INLINE void column_sums(const float* __restrict x, int64_t channels, int64_t p0, int64_t p1,
                                 float* __restrict sums, F f) {
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= channels; c0 += kChannelBlock) {
    float lanes[kChannelBlock] = {0.0f};
    for (int64_t p = p0; p < p1; ++p) {
      const float* __restrict row = x + p * channels + c0;
      for (int64_t j = 0; j < kChannelBlock; ++j) lanes[j] += f(row[j], c0 + j);
    }
    for (int64_t j = 0; j < kChannelBlock; ++j) sums[c0 + j] = lanes[j];
  }
  for (; c0 < channels; ++c0) {
    float total = 0.0f;
    for (int64_t p = p0; p < p1; ++p) total += f(x[p * channels + c0], c0);
    sums[c0] = total;
  }
}

// The moments of every group over positions [p0, p1) of one sample, two passes over the cache-resident chunk
// with float lanes per channel: the first sums x minus the group's first value of the chunk (a shift that
// keeps large means from cancelling), the second the squared deviations from the float32-rounded mean,
// corrected for that rounding as in group_moments. scratch holds 2 * channels floats.
RDP_CORE_ISA_CLONES
void chunk_moments(const GroupNormArgs& args, int64_t sample, int64_t p0, int64_t p1, float* scratch, Moments* out) {
  const int64_t channels = args.channels, per_group = channels / args.groups;
  const float* __restrict x = args.x + sample * args.spatial * channels;
  float* __restrict centre = scratch;
  float* __restrict sums = scratch + channels;
  for (int64_t c = 0; c < channels; ++c) centre[c] = x[p0 * channels + c / per_group * per_group];
  column_sums(x, channels, p0, p1, sums, [centre](float v, int64_t c) { return v - centre[c]; });
  const double count = static_cast<double>((p1 - p0) * per_group);
  for (int64_t g = 0; g < args.groups; ++g) {
    double total = 0.0;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) total += sums[c];
    out[g].mean = centre[g * per_group] + total / count;
  }
  for (int64_t c = 0; c < channels; ++c) centre[c] = static_cast<float>(out[c / per_group].mean);
  column_sums(x, channels, p0, p1, sums, [centre](float v, int64_t c) { return (v - centre[c]) * (v - centre[c]); });
  for (int64_t g = 0; g < args.groups; ++g) {
    double squares = 0.0;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) squares += sums[c];
    const double rounding = out[g].mean - static_cast<double>(static_cast<float>(out[g].mean));
    out[g].m2 = std::max(squares - count * rounding * rounding, 0.0);
  }
}

// Merges the chunks' moments of group g of one sample into its mean and variance.
void merge_moments(const GroupNormArgs& args, const Moments* chunks, int64_t num_chunks, int64_t g, double* mean,
                   double* variance) {
  const int64_t per_chunk = chunk_positions(args.channels), per_group = args.channels / args.groups;
  double n = 0.0, m = 0.0, m2 = 0.0;
  for (int64_t k = 0; k < num_chunks; ++k) {
    const Moments& chunk = chunks[k * args.groups + g];
    const double n_k = static_cast<double>((std::min(args.spatial, (k + 1) * per_chunk) - k * per_chunk) * per_group);
    const double delta = chunk.mean - m;
    n += n_k;
    m += delta * n_k / n;
    m2 += chunk.m2 + delta * delta * (n - n_k) * n_k / n;
  }
  *mean = m;
  *variance = m2 / n;
}

// Per-channel factors of one sample for the normalisation pass: z = (x - centre) * a + b.
struct ChannelFactors {
  std::vector<float> centre, a, b;
  explicit ChannelFactors(int64_t count) : centre(count), a(count), b(count) {}
};

// y over positions [p0, p1) of one sample; centre, a, b are that sample's per-channel factors.
RDP_CORE_ISA_CLONES
void normalize_chunk(const GroupNormArgs& args, int64_t sample, int64_t p0, int64_t p1, const float* centre,
                     const float* a, const float* b, float* y) {
  const int64_t channels = args.channels, offset = sample * args.spatial * channels;
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict row = args.x + offset + p * channels;
    float* __restrict out = y + offset + p * channels;
    if (args.silu) {
      for (int64_t c = 0; c < channels; ++c) out[c] = silu((row[c] - centre[c]) * a[c] + b[c]);
    } else {
      for (int64_t c = 0; c < channels; ++c) out[c] = (row[c] - centre[c]) * a[c] + b[c];
    }
  }
}

void forward_channels_last(const GroupNormArgs& args, double eps, float* y, float* mean, float* rstd) {
  const int64_t chunks = chunks_per_sample(args), channels = args.channels;
  std::vector<Moments> moments(args.n * chunks * args.groups);
  for_each_chunk(args, 2 * channels, [&](int64_t task, int64_t sample, int64_t p0, int64_t p1, float* scratch) {
    chunk_moments(args, sample, p0, p1, scratch, moments.data() + task * args.groups);
  });
  ChannelFactors factors(args.n * channels);
  const int64_t per_group = channels / args.groups;
  for (int64_t ng = 0; ng < args.n * args.groups; ++ng) {
    const int64_t sample = ng / args.groups, g = ng % args.groups;
    double m = 0.0, variance = 0.0;
    merge_moments(args, moments.data() + sample * chunks * args.groups, chunks, g, &m, &variance);
    const double r = 1.0 / std::sqrt(variance + eps);
    const float m_f = static_cast<float>(m);
    mean[ng] = m_f;
    rstd[ng] = static_cast<float>(r);
    const double rounding = m - static_cast<double>(m_f);  // as in forward_group
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      const ChannelAffine affine = channel_affine(args, sample, c);
      const double a = r * affine.alpha;
      const int64_t i = sample * channels + c;
      factors.centre[i] = m_f;
      factors.a[i] = static_cast<float>(a);
      factors.b[i] = static_cast<float>(affine.beta - a * rounding);
    }
  }
  for_each_chunk(args, 0, [&](int64_t, int64_t sample, int64_t p0, int64_t p1, float*) {
    const int64_t at = sample * channels;
    normalize_chunk(args, sample, p0, p1, factors.centre.data() + at, factors.a.data() + at, factors.b.data() + at,
                    y);
  });
}

// Per-channel inputs of the backward for one sample: x_hat = (x - centre) * rstd, z = x_hat * alpha + beta.
struct BackwardFactors {
  std::vector<float> centre, rstd, alpha, beta;
  explicit BackwardFactors(int64_t count) : centre(count), rstd(count), alpha(count), beta(count) {}
};

// dz (into grad_x when there is a SiLU) over one position's channels, accumulating per-channel dz and dz * x_hat.
template <bool kSiLU>
RDP_CORE_INLINE void position_dz(const float* __restrict x, const float* __restrict grad_y, float* __restrict dz,
                                 int64_t channels, const float* __restrict centre, const float* __restrict rstd,
                                 const float* __restrict alpha, const float* __restrict beta,
                                 float* __restrict sum_dz, float* __restrict sum_dz_xhat) {
  for (int64_t c = 0; c < channels; ++c) {
    const float x_hat = (x[c] - centre[c]) * rstd[c];
    const float d = kSiLU ? grad_y[c] * silu_grad(x_hat * alpha[c] + beta[c]) : grad_y[c];
    if (kSiLU) dz[c] = d;
    sum_dz[c] += d;
    sum_dz_xhat[c] += d * x_hat;
  }
}

// First backward pass over positions [p0, p1) of one sample: dz and the chunk's per-channel sums of dz and
// dz * x_hat (float lanes, written as double into sums[2 c], sums[2 c + 1]).
RDP_CORE_ISA_CLONES
void chunk_dz_sums(const GroupNormArgs& args, int64_t sample, int64_t p0, int64_t p1, const BackwardFactors& f,
                   const float* grad_y, float* grad_x, float* scratch, double* sums) {
  const int64_t channels = args.channels, offset = sample * args.spatial * channels, at = sample * channels;
  float* sum_dz = scratch;
  float* sum_dz_xhat = scratch + channels;
  std::fill(scratch, scratch + 2 * channels, 0.0f);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t i = offset + p * channels;
    if (args.silu) {
      position_dz<true>(args.x + i, grad_y + i, grad_x + i, channels, f.centre.data() + at, f.rstd.data() + at,
                        f.alpha.data() + at, f.beta.data() + at, sum_dz, sum_dz_xhat);
    } else {
      position_dz<false>(args.x + i, grad_y + i, grad_x + i, channels, f.centre.data() + at, f.rstd.data() + at,
                         f.alpha.data() + at, f.beta.data() + at, sum_dz, sum_dz_xhat);
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    sums[2 * c] = sum_dz[c];
    sums[2 * c + 1] = sum_dz_xhat[c];
  }
}

// Second pass: grad_x = rstd * (dz * alpha - m1 - x_hat * m2), m1 and m2 the group means of dx_hat and
// dx_hat * x_hat broadcast per channel; dz is grad_x itself with a SiLU and grad_y without.
RDP_CORE_ISA_CLONES
void chunk_grad_x(const GroupNormArgs& args, int64_t sample, int64_t p0, int64_t p1, const BackwardFactors& f,
                  const float* m1, const float* m2, const float* grad_y, float* grad_x) {
  const int64_t channels = args.channels, offset = sample * args.spatial * channels, at = sample * channels;
  const float* __restrict centre = f.centre.data() + at;
  const float* __restrict rstd = f.rstd.data() + at;
  const float* __restrict alpha = f.alpha.data() + at;
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict x = args.x + offset + p * channels;
    const float* dz = (args.silu ? grad_x : grad_y) + offset + p * channels;
    float* out = grad_x + offset + p * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float x_hat = (x[c] - centre[c]) * rstd[c];
      out[c] = rstd[c] * (dz[c] * alpha[c] - m1[c] - x_hat * m2[c]);
    }
  }
}

void backward_channels_last(const GroupNormArgs& args, const float* mean, const float* rstd, const float* grad_y,
                            float* grad_x, double* parameter_sums) {
  const int64_t chunks = chunks_per_sample(args), channels = args.channels, per_group = channels / args.groups;
  BackwardFactors factors(args.n * channels);
  for (int64_t i = 0; i < args.n * channels; ++i) {
    const int64_t sample = i / channels, ng = sample * args.groups + i % channels / per_group;
    const ChannelAffine affine = channel_affine(args, sample, i % channels);
    factors.centre[i] = mean[ng];
    factors.rstd[i] = rstd[ng];
    factors.alpha[i] = affine.alpha;
    factors.beta[i] = affine.beta;
  }
  std::vector<double> chunk_sums(args.n * chunks * 2 * channels);
  for_each_chunk(args, 2 * channels, [&](int64_t task, int64_t sample, int64_t p0, int64_t p1, float* scratch) {
    chunk_dz_sums(args, sample, p0, p1, factors, grad_y, grad_x, scratch, chunk_sums.data() + task * 2 * channels);
  });
  // Per (sample, channel) sums over all chunks, then the group means m1, m2 broadcast per channel.
  std::vector<double> sums(2 * args.n * channels, 0.0);
  for (int64_t task = 0; task < args.n * chunks; ++task) {
    const double* chunk = chunk_sums.data() + task * 2 * channels;
    double* total = sums.data() + task / chunks * 2 * channels;
    for (int64_t j = 0; j < 2 * channels; ++j) total[j] += chunk[j];
  }
  std::vector<float> m1(args.n * channels), m2(args.n * channels);
  const double count = static_cast<double>(per_group * args.spatial);
  for (int64_t ng = 0; ng < args.n * args.groups; ++ng) {
    const int64_t first = ng * per_group;  // == sample * channels + g * per_group
    double group_dz = 0.0, group_dz_xhat = 0.0;
    for (int64_t i = first; i < first + per_group; ++i) {
      group_dz += factors.alpha[i] * sums[2 * i];
      group_dz_xhat += factors.alpha[i] * sums[2 * i + 1];
    }
    std::fill(m1.begin() + first, m1.begin() + first + per_group, static_cast<float>(group_dz / count));
    std::fill(m2.begin() + first, m2.begin() + first + per_group, static_cast<float>(group_dz_xhat / count));
  }
  for_each_chunk(args, 0, [&](int64_t, int64_t sample, int64_t p0, int64_t p1, float*) {
    const int64_t at = sample * channels;
    chunk_grad_x(args, sample, p0, p1, factors, m1.data() + at, m2.data() + at, grad_y, grad_x);
  });
  if (parameter_sums) std::copy(sums.begin(), sums.end(), parameter_sums);
}

}  // namespace

void group_norm_act_forward(const GroupNormArgs& args, double eps, float* y, float* mean, float* rstd) {
  if (args.channels_last) return forward_channels_last(args, eps, y, mean, rstd);
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
  if (args.channels_last) {
    backward_channels_last(args, mean, rstd, grad_y, grad_x, parameters ? sums.data() : nullptr);
    if (parameters) parameter_grads(args, sums.data(), grad_weight, grad_bias, grad_scale, grad_shift);
    return;
  }
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
