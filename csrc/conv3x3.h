// A Winograd F(4x4, 3x3) convolution (Lavin & Gray, 2016) on channels-last float32 buffers. A 3x3, stride-1,
// padding-1 convolution of an (N, H, W, C) image is
//   V = input_transform(x)          (tiles, 36, C): each 6x6 input tile as B^T d B
//   M[t, e, :] = V[t, e, :] @ U[e]  36 independent (C, K) matrix products, U[e] the transformed weights
//   y = output_transform(M) + bias  (N, H, W, K): each tile's 4x4 outputs as A^T M A
// which takes 36 multiplies per 16 outputs and channel pair where the direct convolution takes 144.
// Tiles are numbered (n, tile_row, tile_col) row-major, tile_row < ceil(H / 4), tile_col < ceil(W / 4).
#pragma once
#include <cstdint>

namespace rdp_core {

constexpr int kWinogradTile = 6;      // input tile side: 4 outputs + 3 - 1
constexpr int kWinogradOutput = 4;    // output tile side
constexpr int kWinogradPoints = 36;   // transformed elements per tile

struct ConvImageShape {
  int64_t n, height, width, channels;
  int64_t tile_rows() const { return (height + kWinogradOutput - 1) / kWinogradOutput; }
  int64_t tile_cols() const { return (width + kWinogradOutput - 1) / kWinogradOutput; }
  int64_t tiles() const { return n * tile_rows() * tile_cols(); }
};

constexpr int64_t kWinogradPanel = 32;  // output channels per packed weight panel

// y = conv3x3(x) + bias: x (n, height, width, in_channels) and y (n, height, width, out_channels) contiguous;
// u the transformed filters packed as (36, out_channels / 32, in_channels, 32), each 32-column panel of U[e]
// one contiguous block (out_channels must be a multiple of 32); bias (out_channels) or nullptr. Runs in chunks
// of tiles, each transformed, multiplied and transformed back while it is in cache. The products run on the
// AVX-512 kernel where the CPU has it unless `portable` (for tests of the portable kernel on such CPUs).
void winograd_conv3x3(const ConvImageShape& x_shape, const float* x, const float* u, const float* bias,
                      int64_t out_channels, float* y, bool portable = false);

}  // namespace rdp_core
