// Flash-style attention on the CPU: blocked online softmax, the score matrix never materialised beyond one
// (query block x key block) tile that stays in L1/L2. Every matrix product goes through one register-tiled
// kernel (`gemm`) written with GCC's generic 8-float vectors (see Vec); the elementwise loops (softmax, packing)
// are plain loops GCC vectorizes. RDP_CORE_ISA_CLONES compiles the callers for AVX-512, AVX2+FMA and the
// baseline and picks one at load time.
//
// Layout. The inputs may have any strides (the UNets hand over transposed NCHW views); each head is first
// packed, zero-padded to multiples of kCols tokens and head_dim, into what each product wants: its left
// operand row-major (read one scalar at a time) and its right operand in "panels" of kCols columns stored one
// after the other, so that the register tile streams through contiguous memory. Unpacked, a right operand's
// rows lie a whole row apart (1 KiB at head_dim 256), and the 64-byte pieces a tile reads collide in a few L1
// sets; packed, they are consecutive. Packing is O(tokens * head_dim) per head, against O(tokens^2 * head_dim).
#include "attention.h"
#include "isa.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Vec values never cross a call boundary (every helper taking one is inlined into an ISA clone), so the ABI
// note GCC gives for vector returns in the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rdp_core {
namespace {

// Width of a register tile of `gemm`; token and head_dim counts are padded to multiples of it.
constexpr int64_t kCols = 16;
// Query and key block sizes. A 64 x 128 score tile is 32 KiB, an L1's worth; 128 keys per step halve the
// online-softmax passes over the output rows against 64 keys, which measured 5-15% slower on the forward
// (2-core AMD EPYC); 48 or 96 queries per block measured no different from 64.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
// The backward keeps dK and dV of a whole key block (2 x keys x head_dim floats, 128 KiB at head_dim 256) in
// cache while it walks the queries, and its P and dS tiles (16 KiB each) in L1; 128-query or 32- and 128-key
// blocks measured the same within the noise of a loaded machine.
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = 64;

int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Token and head_dim counts of one problem, rounded up to whole register tiles.
struct Geometry {
  int64_t heads, tokens, dim, tokens_padded, dim_padded;
  float scale;
  explicit Geometry(const AttentionShape& s)
      : heads(s.heads), tokens(s.tokens), dim(s.head_dim), tokens_padded(round_up(s.tokens)),
        dim_padded(round_up(s.head_dim)), scale(static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)))) {}
  static int64_t round_up(int64_t n) { return (n + kCols - 1) / kCols * kCols; }
};

enum class Store { kOverwrite, kAccumulate, kScaleAccumulate };

// Eight floats, GCC's generic vector type: one AVX2 register (two SSE ones in the baseline clone). Plain loops
// over a register tile do not work here: GCC 12 vectorizes them with 128-bit vectors and keeps the 64
// accumulators on the stack (5 GFLOP/s measured, against ~25 once the tile is written with these vectors).
typedef float Vec __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
static_assert(kCols == 2 * kLanes, "a register tile row is two vectors");

RDP_CORE_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
RDP_CORE_INLINE void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// One kRowsTile x kCols tile of C: c = (0 | c | row_scale * c) + sum_t a[r * a_row + t * a_depth] * b[t * kCols]
// over depth steps, b one panel of B. Accumulators stay in registers: 2 * kRowsTile vectors (12 of the 16 AVX2
// registers at 6).
template <int64_t kRowsTile, Store kStore>
RDP_CORE_INLINE void gemm_tile(int64_t depth, const float* __restrict a, int64_t a_row, int64_t a_depth,
                               const float* __restrict b, float* __restrict c, int64_t ldc,
                               const float* __restrict row_scale) {
  Vec acc[kRowsTile][2];
  for (int64_t r = 0; r < kRowsTile; ++r) {
    for (int64_t x = 0; x < 2; ++x) {
      if (kStore == Store::kOverwrite) {
        acc[r][x] = Vec{} + 0.0f;
      } else {
        const float s = kStore == Store::kScaleAccumulate ? row_scale[r] : 1.0f;
        acc[r][x] = load(c + r * ldc + x * kLanes) * s;
      }
    }
  }
  for (int64_t t = 0; t < depth; ++t) {
    const Vec b0 = load(b + t * kCols), b1 = load(b + t * kCols + kLanes);
    for (int64_t r = 0; r < kRowsTile; ++r) {
      const float ar = a[r * a_row + t * a_depth];
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  for (int64_t r = 0; r < kRowsTile; ++r) {
    store(c + r * ldc, acc[r][0]);
    store(c + r * ldc + kLanes, acc[r][1]);
  }
}

// c[i][j] = (0 | c[i][j] | row_scale[i] * c[i][j]) + sum_t a[i * a_row + t * a_depth] * B[t][j] for rows a
// multiple of 4 and cols a multiple of kCols. A is read one scalar at a time (broadcast), so any orientation of
// it works; B is in panels (B[t][j] = b[(j / kCols) * b_panel + t * kCols + j % kCols]); C is row-major. Rows go
// in tiles of 6 (12 accumulators, 2 loads and 6 broadcasts per 12 FMAs) and up to two of 4.
template <Store kStore>
RDP_CORE_INLINE void gemm(int64_t rows, int64_t cols, int64_t depth, const float* __restrict a, int64_t a_row,
                          int64_t a_depth, const float* __restrict b, int64_t b_panel, float* __restrict c,
                          int64_t ldc, const float* __restrict row_scale) {
  const int64_t end6 = rows - rows % 12;  // rows is a multiple of 4: 6-row tiles, then zero to two 4-row tiles
  for (int64_t j = 0; j < cols; j += kCols) {
    const float* panel = b + (j / kCols) * b_panel;
    int64_t i = 0;
    for (; i < end6; i += 6) {
      gemm_tile<6, kStore>(depth, a + i * a_row, a_row, a_depth, panel, c + i * ldc + j, ldc, row_scale + i);
    }
    for (; i < rows; i += 4) {
      gemm_tile<4, kStore>(depth, a + i * a_row, a_row, a_depth, panel, c + i * ldc + j, ldc, row_scale + i);
    }
  }
}

// dst[i * dst_i + j * dst_j] = src[i * src_i + j * src_j] for i < ni, j < nj, walking the source's unit-stride
// dimension innermost when it has one: rows of contiguous tensors and columns of transposed NCHW views are then
// read in order (one strided element per cache line would be read otherwise).
void copy_2d(const float* __restrict src, int64_t src_i, int64_t src_j, float* __restrict dst, int64_t dst_i,
             int64_t dst_j, int64_t ni, int64_t nj) {
  if (src_i == 1 && src_j != 1) {
    std::swap(src_i, src_j);
    std::swap(dst_i, dst_j);
    std::swap(ni, nj);
  }
  for (int64_t i = 0; i < ni; ++i) {
    for (int64_t j = 0; j < nj; ++j) dst[i * dst_i + j * dst_j] = src[i * src_i + j * src_j];
  }
}

// Rows n0 .. n0 + rows of src[b, h] row-major, dim_padded floats each; zero outside the tensor.
void pack_rows(const ConstView& src, int64_t b, int64_t h, int64_t n0, int64_t rows, const Geometry& g, float* dst) {
  std::fill(dst, dst + rows * g.dim_padded, 0.0f);
  const int64_t valid = std::max<int64_t>(0, std::min(rows, g.tokens - n0));
  if (valid > 0) copy_2d(&src.at(b, h, n0, 0), src.stride[2], src.stride[3], dst, g.dim_padded, 1, valid, g.dim);
}

// src[b, h] as tokens_padded x dim_padded panels (zero outside the tensor):
// dst[(d / kCols) * tokens_padded * kCols + n * kCols + d % kCols] = src[b, h, n, d].
void pack_panels(const ConstView& src, int64_t b, int64_t h, const Geometry& g, float* dst) {
  const int64_t panel = g.tokens_padded * kCols;
  std::fill(dst, dst + panel * (g.dim_padded / kCols), 0.0f);
  for (int64_t d0 = 0; d0 < g.dim; d0 += kCols) {
    copy_2d(&src.at(b, h, 0, d0), src.stride[2], src.stride[3], dst + (d0 / kCols) * panel, kCols, 1, g.tokens,
            std::min(kCols, g.dim - d0));
  }
}

// src[b, h]^T as dim x tokens_padded panels (keys past `tokens` zero):
// dst[(n / kCols) * dim * kCols + d * kCols + n % kCols] = src[b, h, n, d].
void pack_panels_transposed(const ConstView& src, int64_t b, int64_t h, const Geometry& g, float* dst) {
  std::fill(dst, dst + g.dim * g.tokens_padded, 0.0f);
  for (int64_t n0 = 0; n0 < g.tokens; n0 += kCols) {
    copy_2d(&src.at(b, h, n0, 0), src.stride[3], src.stride[2], dst + (n0 / kCols) * g.dim * kCols, kCols, 1, g.dim,
            std::min(kCols, g.tokens - n0));
  }
}

// Online softmax over one block of scores: rows of s (stride kBlockK) become exp(scale * s - m_new), columns
// from `valid` on become 0, and the running max m, sum l and the factor alpha that rescales earlier output
// are updated per row.
RDP_CORE_INLINE void softmax_block(float* __restrict s, int64_t rows, int64_t cols, int64_t valid, float scale,
                                   float* __restrict m, float* __restrict l, float* __restrict alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * kBlockK;
    float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < valid; ++j) top = row[j] > top ? row[j] : top;
    const float m_new = std::max(m[r], top * scale);  // scale > 0: the max commutes with it
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < valid; ++j) {
      const float p = exp_approx(row[j] * scale - m_new);
      row[j] = p;
      sum += p;
    }
    std::fill(row + valid, row + cols, 0.0f);
    alpha[r] = exp_approx(m[r] - m_new);  // m = -inf on the first block: ~1e-38 times l = 0
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

// Per-thread scratch of the forward pass.
struct ForwardScratch {
  std::vector<float> q, acc, s, m, l, alpha;
  explicit ForwardScratch(const Geometry& g)
      : q(kBlockQ * g.dim_padded), acc(kBlockQ * g.dim_padded), s(kBlockQ * kBlockK), m(kBlockQ), l(kBlockQ),
        alpha(kBlockQ) {}
};

// One block of up to kBlockQ queries of head (b, h) against all keys: kt holds K^T and vp V, in panels.
RDP_CORE_ISA_CLONES
void forward_block(const Geometry& g, const ConstView& q, int64_t b, int64_t h, int64_t q0, const float* kt,
                   const float* vp, const MutableView& out, float* lse, ForwardScratch& w) {
  const int64_t rows = std::min(kBlockQ, g.tokens_padded - q0);
  pack_rows(q, b, h, q0, rows, g, w.q.data());
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  for (int64_t k0 = 0; k0 < g.tokens_padded; k0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, g.tokens_padded - k0);
    gemm<Store::kOverwrite>(rows, cols, g.dim, w.q.data(), g.dim_padded, 1, kt + k0 * g.dim, g.dim * kCols,
                            w.s.data(), kBlockK, nullptr);
    softmax_block(w.s.data(), rows, cols, std::min(cols, g.tokens - k0), g.scale, w.m.data(), w.l.data(),
                  w.alpha.data());
    const float* v_block = vp + k0 * kCols;
    const int64_t v_panel = g.tokens_padded * kCols;
    if (k0 == 0) {
      gemm<Store::kOverwrite>(rows, g.dim_padded, cols, w.s.data(), kBlockK, 1, v_block, v_panel, w.acc.data(),
                              g.dim_padded, nullptr);
    } else {
      gemm<Store::kScaleAccumulate>(rows, g.dim_padded, cols, w.s.data(), kBlockK, 1, v_block, v_panel,
                                    w.acc.data(), g.dim_padded, w.alpha.data());
    }
  }
  const int64_t valid = std::min(rows, g.tokens - q0);
  for (int64_t r = 0; r < valid; ++r) {
    const float inv = 1.0f / w.l[r];
    for (int64_t d = 0; d < g.dim; ++d) out.at(b, h, q0 + r, d) = w.acc[r * g.dim_padded + d] * inv;
    lse[q0 + r] = w.m[r] + std::log(w.l[r]);
  }
}

// Per-thread scratch of the backward pass: one head packed in every orientation the products need.
struct BackwardScratch {
  std::vector<float> q, dout, q_panels, k_panels, dout_panels, kt, vt, dq, delta, p, dp, dk, dv;
  explicit BackwardScratch(const Geometry& g)
      : q(g.tokens_padded * g.dim_padded), dout(q.size()), q_panels(q.size()), k_panels(q.size()),
        dout_panels(q.size()), kt(g.dim * g.tokens_padded), vt(kt.size()), dq(q.size()), delta(g.tokens_padded),
        p(kBwdBlockQ * kBwdBlockK), dp(p.size()), dk(kBwdBlockK * g.dim_padded), dv(dk.size()) {}
};

// delta[n] = sum_d dout[n, d] * out[n, d], the row term of the softmax backward; 0 on padded rows.
void row_dots(const Geometry& g, const ConstView& out, const ConstView& dout, int64_t b, int64_t h, float* delta) {
  std::fill(delta, delta + g.tokens_padded, 0.0f);
  for (int64_t n = 0; n < g.tokens; ++n) {
    double sum = 0.0;
    for (int64_t d = 0; d < g.dim; ++d) sum += static_cast<double>(out.at(b, h, n, d)) * dout.at(b, h, n, d);
    delta[n] = static_cast<float>(sum);
  }
}

// p <- P = exp(scale * s - lse) and dp <- dS = P * (dP - delta) on one (query block x key block) tile; zero
// outside the valid rows and columns so that padding contributes nothing to dK and dV.
RDP_CORE_INLINE void softmax_grad_block(float* __restrict p, float* __restrict dp, int64_t rows, int64_t cols,
                                        int64_t valid_rows, int64_t valid_cols, float scale,
                                        const float* __restrict lse, const float* __restrict delta) {
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = p + r * kBwdBlockK;
    float* dpr = dp + r * kBwdBlockK;
    const int64_t valid = r < valid_rows ? valid_cols : 0;
    const float shift = r < valid_rows ? lse[r] : 0.0f;
    const float dr = delta[r];
    for (int64_t j = 0; j < valid; ++j) {
      const float prob = exp_approx(pr[j] * scale - shift);
      pr[j] = prob;
      dpr[j] = prob * (dpr[j] - dr);
    }
    std::fill(pr + valid, pr + cols, 0.0f);
    std::fill(dpr + valid, dpr + cols, 0.0f);
  }
}

void write_scaled_rows(const Geometry& g, const float* src, int64_t n0, int64_t rows, float scale,
                       const MutableView& dst, int64_t b, int64_t h) {
  const int64_t valid = std::min(rows, g.tokens - n0);
  for (int64_t r = 0; r < valid; ++r) {
    for (int64_t d = 0; d < g.dim; ++d) dst.at(b, h, n0 + r, d) = src[r * g.dim_padded + d] * scale;
  }
}

// The tiles of one head with keys in [key_begin, key_end): keys in the outer loop (dK, dV of one key block
// accumulate in cache), queries inside; dQ accumulates over the key blocks in a head-sized buffer and goes to
// dq, or, scaled, to dq_partial (tokens_padded x dim_padded) when other tasks cover the head's other keys.
// Five products per tile, as in FlashAttention-2.
RDP_CORE_ISA_CLONES
void backward_keys(const Geometry& g, const ConstView& q, const ConstView& k, const ConstView& v,
                   const ConstView& out, const ConstView& dout, int64_t b, int64_t h, const float* lse,
                   int64_t key_begin, int64_t key_end, const MutableView& dq, float* dq_partial,
                   const MutableView& dk, const MutableView& dv, BackwardScratch& w) {
  const int64_t np = g.tokens_padded, dp = g.dim_padded;
  // Left operands row-major (q, dout), right operands in panels (the rest).
  pack_rows(q, b, h, 0, np, g, w.q.data());
  pack_rows(dout, b, h, 0, np, g, w.dout.data());
  pack_panels(q, b, h, g, w.q_panels.data());
  pack_panels(k, b, h, g, w.k_panels.data());
  pack_panels(dout, b, h, g, w.dout_panels.data());
  pack_panels_transposed(k, b, h, g, w.kt.data());
  pack_panels_transposed(v, b, h, g, w.vt.data());
  const int64_t row_panel = np * kCols, dim_panel = g.dim * kCols;  // panel strides
  row_dots(g, out, dout, b, h, w.delta.data());
  for (int64_t k0 = key_begin; k0 < key_end; k0 += kBwdBlockK) {
    const int64_t cols = std::min(kBwdBlockK, np - k0);
    for (int64_t q0 = 0; q0 < np; q0 += kBwdBlockQ) {
      const int64_t rows = std::min(kBwdBlockQ, np - q0);
      const float* q_block = w.q.data() + q0 * dp;
      const float* dout_block = w.dout.data() + q0 * dp;
      gemm<Store::kOverwrite>(rows, cols, g.dim, q_block, dp, 1, w.kt.data() + k0 * g.dim, dim_panel, w.p.data(),
                              kBwdBlockK, nullptr);
      gemm<Store::kOverwrite>(rows, cols, g.dim, dout_block, dp, 1, w.vt.data() + k0 * g.dim, dim_panel, w.dp.data(),
                              kBwdBlockK, nullptr);
      softmax_grad_block(w.p.data(), w.dp.data(), rows, cols, std::min(rows, g.tokens - q0),
                         std::min(cols, g.tokens - k0), g.scale, lse + q0, w.delta.data() + q0);
      // dV += P^T dO and dK += dS^T Q: A is read transposed (row step 1, depth step kBwdBlockK).
      const float* dout_rows = w.dout_panels.data() + q0 * kCols;
      const float* q_rows = w.q_panels.data() + q0 * kCols;
      if (q0 == 0) {
        gemm<Store::kOverwrite>(cols, dp, rows, w.p.data(), 1, kBwdBlockK, dout_rows, row_panel, w.dv.data(), dp,
                                nullptr);
        gemm<Store::kOverwrite>(cols, dp, rows, w.dp.data(), 1, kBwdBlockK, q_rows, row_panel, w.dk.data(), dp,
                                nullptr);
      } else {
        gemm<Store::kAccumulate>(cols, dp, rows, w.p.data(), 1, kBwdBlockK, dout_rows, row_panel, w.dv.data(), dp,
                                 nullptr);
        gemm<Store::kAccumulate>(cols, dp, rows, w.dp.data(), 1, kBwdBlockK, q_rows, row_panel, w.dk.data(), dp,
                                 nullptr);
      }
      float* dq_block = w.dq.data() + q0 * dp;
      const float* k_rows = w.k_panels.data() + k0 * kCols;
      if (k0 == key_begin) {
        gemm<Store::kOverwrite>(rows, dp, cols, w.dp.data(), kBwdBlockK, 1, k_rows, row_panel, dq_block, dp,
                                nullptr);
      } else {
        gemm<Store::kAccumulate>(rows, dp, cols, w.dp.data(), kBwdBlockK, 1, k_rows, row_panel, dq_block, dp,
                                 nullptr);
      }
    }
    write_scaled_rows(g, w.dk.data(), k0, cols, g.scale, dk, b, h);
    write_scaled_rows(g, w.dv.data(), k0, cols, 1.0f, dv, b, h);
  }
  if (dq_partial == nullptr) {
    write_scaled_rows(g, w.dq.data(), 0, np, g.scale, dq, b, h);
  } else {
    for (int64_t i = 0; i < np * dp; ++i) dq_partial[i] = w.dq[i] * g.scale;
  }
}

// dq[b, h] = the sum of `splits` partial dQs of one head.
void sum_partials(const Geometry& g, const float* partials, int64_t splits, const MutableView& dq, int64_t b,
                  int64_t h) {
  const int64_t size = g.tokens_padded * g.dim_padded;
  for (int64_t n = 0; n < g.tokens; ++n) {
    for (int64_t d = 0; d < g.dim; ++d) {
      float sum = 0.0f;
      for (int64_t s = 0; s < splits; ++s) sum += partials[s * size + n * g.dim_padded + d];
      dq.at(b, h, n, d) = sum;
    }
  }
}

}  // namespace

void attention_forward(const AttentionShape& shape, ConstView q, ConstView k, ConstView v, MutableView out,
                       float* lse) {
  const Geometry g(shape);
  const int64_t heads = shape.batch * shape.heads;
  const int64_t head_size = g.tokens_padded * g.dim_padded;
  const int64_t blocks = (g.tokens_padded + kBlockQ - 1) / kBlockQ;
  // K^T and V of every head, packed once and shared by the threads that work on that head's query blocks. The
  // buffer is kept per calling thread and reused: fresh megabytes on every call cost page faults, 3% of the
  // forward at 8 x 1 x 256 x 256. It only grows, to the largest problem the thread has run.
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(2 * heads * head_size)) packed.resize(2 * heads * head_size);
  float* const kt_all = packed.data();
  float* const vp_all = packed.data() + heads * head_size;
#ifdef _OPENMP  // without OpenMP everything runs in order on one thread
#pragma omp parallel
#endif
  {
    ForwardScratch scratch(g);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t bh = 0; bh < heads; ++bh) {
      const int64_t b = bh / shape.heads, h = bh % shape.heads;
      pack_panels_transposed(k, b, h, g, kt_all + bh * head_size);
      pack_panels(v, b, h, g, vp_all + bh * head_size);
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic)  // many small tasks: a preempted thread does not hold up the rest
#endif
    for (int64_t task = 0; task < heads * blocks; ++task) {
      const int64_t bh = task / blocks, b = bh / shape.heads, h = bh % shape.heads;
      forward_block(g, q, b, h, (task % blocks) * kBlockQ, kt_all + bh * head_size, vp_all + bh * head_size,
                    out, lse + bh * g.tokens, scratch);
    }
  }
}

void attention_backward(const AttentionShape& shape, ConstView q, ConstView k, ConstView v, ConstView out,
                        ConstView grad_out, const float* lse, MutableView dq, MutableView dk, MutableView dv) {
  const Geometry g(shape);
  const int64_t heads = shape.batch * shape.heads;
  // A task is one head, or with fewer heads than threads (batch 1 through DDPM++'s single head) a range of its
  // key blocks, each with its own partial dQ, summed at the end: dQ of a query needs every key.
  const int64_t key_blocks = (g.tokens_padded + kBwdBlockK - 1) / kBwdBlockK;
  const int64_t splits = std::min(key_blocks, std::max<int64_t>(1, (max_threads() + heads - 1) / heads));
  const int64_t head_size = g.tokens_padded * g.dim_padded;
  std::vector<float> partials(splits > 1 ? heads * splits * head_size : 0);
#ifdef _OPENMP
#pragma omp parallel
#endif
  {
    BackwardScratch scratch(g);
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
    for (int64_t task = 0; task < heads * splits; ++task) {
      const int64_t bh = task / splits, split = task % splits, b = bh / shape.heads, h = bh % shape.heads;
      const int64_t key_begin = split * key_blocks / splits * kBwdBlockK;
      const int64_t key_end = std::min((split + 1) * key_blocks / splits * kBwdBlockK, g.tokens_padded);
      float* partial = splits > 1 ? partials.data() + task * head_size : nullptr;
      backward_keys(g, q, k, v, out, grad_out, b, h, lse + bh * g.tokens, key_begin, key_end, dq, partial, dk, dv,
                    scratch);
    }
    if (splits > 1) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t bh = 0; bh < heads; ++bh) {
        sum_partials(g, partials.data() + bh * splits * head_size, splits, dq, bh / shape.heads, bh % shape.heads);
      }
    }
  }
}

}  // namespace rdp_core
