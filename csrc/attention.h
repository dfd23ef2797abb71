// Softmax attention softmax(q k^T / sqrt(head_dim)) v on float32 CPU buffers (no torch: the build needs only a
// compiler). Tensors are (batch, heads, tokens, head_dim) with arbitrary non-negative strides, so the UNets'
// transposed NCHW views are read in place; the kernels pack what they need into cache-friendly tiles.
#pragma once
#include <cstdint>

namespace rdp_core {

struct AttentionShape {
  int64_t batch, heads, tokens, head_dim;
};

// A (batch, heads, tokens, head_dim) float32 tensor: base pointer and strides in elements.
template <typename T>
struct Strided4 {
  T* data;
  int64_t stride[4];
  T& at(int64_t b, int64_t h, int64_t n, int64_t d) const {
    return data[b * stride[0] + h * stride[1] + n * stride[2] + d * stride[3]];
  }
};
using ConstView = Strided4<const float>;
using MutableView = Strided4<float>;

// out = attention(q, k, v); lse: (batch * heads * tokens) contiguous, the natural-log row logsumexp of the
// scaled scores, kept for the backward pass.
void attention_forward(const AttentionShape& shape, ConstView q, ConstView k, ConstView v, MutableView out,
                       float* lse);

// dq, dk, dv: the vector-Jacobian product of attention with grad_out, given the forward's out and lse.
void attention_backward(const AttentionShape& shape, ConstView q, ConstView k, ConstView v, ConstView out,
                        ConstView grad_out, const float* lse, MutableView dq, MutableView dk, MutableView dv);

}  // namespace rdp_core
