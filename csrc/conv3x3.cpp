#include "conv3x3.h"
#include "isa.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RDP_CORE_HAVE_AVX512_GEMM 1
#endif

namespace rdp_core {
namespace {

// Channels per pass: the 6x6 tile of one block (36 x 64 floats, 9 KiB) and its transform stay in L1, and the
// inner loops over the block are what the compiler vectorizes.
constexpr int64_t kBlock = 64;

// out[i] = (B^T in)[i] along one axis, element-wise over `width` channels; in and out are 6 rows apart by
// `in_stride` and `out_stride` floats. B^T is Lavin's for the points 0, +-1, +-2.
RDP_CORE_INLINE void input_rows(const float* __restrict in, int64_t in_stride, float* __restrict out,
                                int64_t out_stride, int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    const float d0 = in[c], d1 = in[in_stride + c], d2 = in[2 * in_stride + c];
    const float d3 = in[3 * in_stride + c], d4 = in[4 * in_stride + c], d5 = in[5 * in_stride + c];
    out[c] = 4.0f * d0 - 5.0f * d2 + d4;
    out[out_stride + c] = -4.0f * (d1 + d2) + d3 + d4;
    out[2 * out_stride + c] = 4.0f * (d1 - d2) - d3 + d4;
    out[3 * out_stride + c] = 2.0f * (d3 - d1) - d2 + d4;
    out[4 * out_stride + c] = 2.0f * (d1 - d3) - d2 + d4;
    out[5 * out_stride + c] = 4.0f * d1 - 5.0f * d3 + d5;
  }
}

// out[i] = (A^T in)[i] for the 4 output rows from 6 transformed rows.
RDP_CORE_INLINE void output_rows(const float* __restrict in, int64_t in_stride, float* __restrict out,
                                 int64_t out_stride, int64_t width) {
  for (int64_t c = 0; c < width; ++c) {
    const float m0 = in[c], m1 = in[in_stride + c], m2 = in[2 * in_stride + c];
    const float m3 = in[3 * in_stride + c], m4 = in[4 * in_stride + c], m5 = in[5 * in_stride + c];
    const float sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
    out[c] = m0 + sum12 + sum34;
    out[out_stride + c] = diff12 + 2.0f * diff34;
    out[2 * out_stride + c] = sum12 + 4.0f * sum34;
    out[3 * out_stride + c] = diff12 + 8.0f * diff34 + m5;
  }
}

struct TileOrigin {
  int64_t n, row, col;  // the tile's image and its top-left output pixel
};

RDP_CORE_INLINE TileOrigin tile_origin(const ConvImageShape& s, int64_t tile) {
  const int64_t per_image = s.tile_rows() * s.tile_cols();
  const int64_t in_image = tile % per_image;
  return {tile / per_image, (in_image / s.tile_cols()) * kWinogradOutput, (in_image % s.tile_cols()) * kWinogradOutput};
}

RDP_CORE_ISA_CLONES
void input_transform_tile(const ConvImageShape& s, const float* __restrict x, int64_t tile, float* __restrict v) {
  // v: this tile's (36, channels) rows
  const TileOrigin o = tile_origin(s, tile);
  alignas(64) float d[kWinogradPoints * kBlock];
  alignas(64) float rows[kWinogradPoints * kBlock];
  for (int64_t c0 = 0; c0 < s.channels; c0 += kBlock) {
    const int64_t width = std::min(kBlock, s.channels - c0);
    for (int i = 0; i < kWinogradTile; ++i) {
      const int64_t y = o.row - 1 + i;  // padding 1: the tile starts one pixel above and left of its outputs
      for (int j = 0; j < kWinogradTile; ++j) {
        const int64_t xx = o.col - 1 + j;
        float* dst = d + (i * kWinogradTile + j) * kBlock;
        if (y < 0 || y >= s.height || xx < 0 || xx >= s.width) {
          std::fill(dst, dst + width, 0.0f);
        } else {
          const float* src = x + ((o.n * s.height + y) * s.width + xx) * s.channels + c0;
          std::copy(src, src + width, dst);
        }
      }
    }
    for (int j = 0; j < kWinogradTile; ++j) {  // B^T d: combine rows, column by column
      input_rows(d + j * kBlock, kWinogradTile * kBlock, rows + j * kBlock, kWinogradTile * kBlock, width);
    }
    float* out = v + c0;
    for (int i = 0; i < kWinogradTile; ++i) {  // (B^T d) B: combine columns, straight into V's rows
      input_rows(rows + i * kWinogradTile * kBlock, kBlock, out + i * kWinogradTile * s.channels, s.channels, width);
    }
  }
}

RDP_CORE_ISA_CLONES
void output_transform_tile(const ConvImageShape& s, const float* __restrict m, const float* __restrict bias,
                           int64_t tile, float* __restrict y) {
  // m: this tile's (36, channels) rows
  const TileOrigin o = tile_origin(s, tile);
  alignas(64) float rows[kWinogradOutput * kWinogradTile * kBlock];
  alignas(64) float out[kWinogradOutput * kWinogradOutput * kBlock];
  for (int64_t c0 = 0; c0 < s.channels; c0 += kBlock) {
    const int64_t width = std::min(kBlock, s.channels - c0);
    const float* in = m + c0;
    for (int j = 0; j < kWinogradTile; ++j) {  // A^T M
      output_rows(in + j * s.channels, kWinogradTile * s.channels, rows + j * kBlock, kWinogradTile * kBlock, width);
    }
    for (int i = 0; i < kWinogradOutput; ++i) {  // (A^T M) A
      output_rows(rows + i * kWinogradTile * kBlock, kBlock, out + i * kWinogradOutput * kBlock, kBlock, width);
    }
    for (int i = 0; i < kWinogradOutput && o.row + i < s.height; ++i) {
      for (int j = 0; j < kWinogradOutput && o.col + j < s.width; ++j) {
        const float* src = out + (i * kWinogradOutput + j) * kBlock;
        float* dst = y + ((o.n * s.height + o.row + i) * s.width + o.col + j) * s.channels + c0;
        if (bias) {
          for (int64_t c = 0; c < width; ++c) dst[c] = src[c] + bias[c0 + c];
        } else {
          std::copy(src, src + width, dst);
        }
      }
    }
  }
}

// One row block of the products: rows [row, row + rows) of V[:, e, :] times one 32-column panel of U[e],
// into the same rows of M[:, e, panel]. a_stride and c_stride are V's and M's row strides (36 * channels).
// The portable version; the compiler vectorizes its inner loops over the panel for the CPU it is cloned for.
constexpr int kRows = 8;  // rows per block: 8 x 32 accumulators are 16 AVX-512 registers

RDP_CORE_ISA_CLONES
void gemm_block_portable(int rows, int64_t depth, const float* __restrict a, int64_t a_stride,
                         const float* __restrict panel, float* __restrict c, int64_t c_stride) {
  alignas(64) float acc[kRows][kWinogradPanel] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const float* b = panel + k * kWinogradPanel;
    for (int r = 0; r < rows; ++r) {
      const float a_rk = a[r * a_stride + k];
      for (int j = 0; j < kWinogradPanel; ++j) acc[r][j] += a_rk * b[j];
    }
  }
  for (int r = 0; r < rows; ++r) std::copy(acc[r], acc[r] + kWinogradPanel, c + r * c_stride);
}

#ifdef RDP_CORE_HAVE_AVX512_GEMM
// The same block with the accumulators held in registers: per step of the depth, two loads of the panel row
// and kRows broadcasts feed 2 * kRows independent FMAs.
__attribute__((target("avx512f"))) void gemm_block_avx512(int rows, int64_t depth, const float* __restrict a,
                                                          int64_t a_stride, const float* __restrict panel,
                                                          float* __restrict c, int64_t c_stride) {
  if (rows != kRows) {  // the last, partial block of rows
    gemm_block_portable(rows, depth, a, a_stride, panel, c, c_stride);
    return;
  }
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kWinogradPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + k * kWinogradPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 a_rk = _mm512_set1_ps(a[r * a_stride + k]);
      acc[r][0] = _mm512_fmadd_ps(a_rk, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a_rk, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(c + r * c_stride, acc[r][0]);
    _mm512_storeu_ps(c + r * c_stride + 16, acc[r][1]);
  }
}
#endif

using GemmBlock = void (*)(int, int64_t, const float*, int64_t, const float*, float*, int64_t);

GemmBlock select_gemm_block() {
#ifdef RDP_CORE_HAVE_AVX512_GEMM
  if (__builtin_cpu_supports("avx512f")) return gemm_block_avx512;
#endif
  return gemm_block_portable;
}

// Products of tiles [0, tiles) of one chunk: M[t, e] = V[t, e] @ U[e], shared out among the calling team.
void batched_gemm(GemmBlock gemm_block, int64_t tiles, int64_t in_channels, int64_t out_channels, const float* v,
                  const float* u, float* m) {
  const int64_t panels = out_channels / kWinogradPanel;
  const int64_t a_stride = kWinogradPoints * in_channels, c_stride = kWinogradPoints * out_channels;
  // One work item per (point, panel): its packed panel (in_channels x 32 floats) stays in L1 while the chunk's
  // row blocks of V[:, e, :] stream past it.
#pragma omp for schedule(static)
  for (int64_t item = 0; item < kWinogradPoints * panels; ++item) {
    const int64_t e = item / panels, p = item % panels;
    const float* panel = u + (e * panels + p) * in_channels * kWinogradPanel;
    for (int64_t row = 0; row < tiles; row += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, tiles - row));
      gemm_block(rows, in_channels, v + row * a_stride + e * in_channels, a_stride, panel,
                 m + row * c_stride + e * out_channels + p * kWinogradPanel, c_stride);
    }
  }
}

// Tiles per chunk: the chunk's V and M together about kChunkBytes, so that they stay in cache between the three
// steps instead of making a round trip through memory (and a fresh allocation's page faults) each; a multiple of
// the GEMM's row block.
constexpr int64_t kChunkBytes = int64_t{4} << 20;

int64_t tiles_per_chunk(int64_t in_channels, int64_t out_channels) {
  const int64_t bytes_per_tile = kWinogradPoints * (in_channels + out_channels) * int64_t{sizeof(float)};
  return std::max<int64_t>(kRows, kChunkBytes / bytes_per_tile / kRows * kRows);
}

}  // namespace

void winograd_conv3x3(const ConvImageShape& x_shape, const float* x, const float* u, const float* bias,
                      int64_t out_channels, float* y, bool portable) {
  static const GemmBlock fastest = select_gemm_block();
  const GemmBlock gemm_block = portable ? gemm_block_portable : fastest;
  const ConvImageShape y_shape{x_shape.n, x_shape.height, x_shape.width, out_channels};
  const int64_t in_channels = x_shape.channels, tiles = x_shape.tiles();
  const int64_t chunk = std::min(tiles, tiles_per_chunk(in_channels, out_channels));
  // Reused across calls (a thread's scratch only grows): fresh pages cost more than the transforms' arithmetic.
  thread_local std::vector<float> scratch;
  scratch.resize(std::max<size_t>(scratch.size(), chunk * kWinogradPoints * (in_channels + out_channels)));
  float* v = scratch.data();
  float* m = v + chunk * kWinogradPoints * in_channels;
#pragma omp parallel
  for (int64_t first = 0; first < tiles; first += chunk) {
    const int64_t count = std::min(chunk, tiles - first);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < count; ++t) {
      input_transform_tile(x_shape, x, first + t, v + t * kWinogradPoints * in_channels);
    }
    batched_gemm(gemm_block, count, in_channels, out_channels, v, u, m);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < count; ++t) {
      output_transform_tile(y_shape, m + t * kWinogradPoints * out_channels, bias, first + t, y);
    }
  }
}

}  // namespace rdp_core
