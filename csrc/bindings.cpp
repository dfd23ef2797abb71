// The one pybind11 module of rdp_core: plain buffers in, plain buffers out. The Python side
// (rdp_core/ops) passes zero-copy numpy views of torch tensors and owns every allocation.
#include <pybind11/pybind11.h>

#include <array>
#include <string>
#include <vector>

#include "attention.h"
#include "conv3x3.h"
#include "group_norm_silu.h"

namespace py = pybind11;

namespace {

// A ValueError naming `name` unless `info` is a C-contiguous float32 buffer of exactly `count` elements.
void check_float_buffer(const py::buffer_info& info, const char* name, int64_t count) {
  if (info.format != py::format_descriptor<float>::format()) {
    throw py::value_error(std::string(name) + ": expected float32 data, got format '" + info.format + "'");
  }
  if (info.size != count) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(count) + " elements, got " +
                          std::to_string(info.size));
  }
  py::ssize_t expected_stride = static_cast<py::ssize_t>(sizeof(float));
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expected_stride) {
      throw py::value_error(std::string(name) + ": expected a C-contiguous buffer");
    }
    expected_stride *= info.shape[d];
  }
}

py::buffer_info float_buffer(const py::buffer& buffer, const char* name, int64_t count, bool writable) {
  py::buffer_info info = buffer.request(writable);
  check_float_buffer(info, name, count);
  return info;
}

// Same for a buffer that may be None (an empty buffer_info, whose ptr is nullptr).
py::buffer_info optional_float_buffer(const py::object& buffer, const char* name, int64_t count) {
  if (buffer.is_none()) return py::buffer_info();
  return float_buffer(buffer.cast<py::buffer>(), name, count, false);
}

// (N, C, HW) of an (N, C, *spatial) buffer, or of an (N, *spatial, C) one when channels_last: any number of
// spatial dims, flattened; none means HW = 1.
std::array<int64_t, 3> batch_channels_spatial(const py::buffer_info& x, bool channels_last) {
  if (x.ndim < 2) {
    throw py::value_error(std::string("x: expected shape ") + (channels_last ? "(N, *spatial, C)" : "(N, C, *spatial)") +
                          ", got " + std::to_string(x.ndim) + " dimension(s)");
  }
  const py::ssize_t channel_dim = channels_last ? x.ndim - 1 : 1;
  int64_t spatial = 1;
  for (py::ssize_t d = 1; d < x.ndim; ++d) {
    if (d != channel_dim) spatial *= x.shape[d];
  }
  return {static_cast<int64_t>(x.shape[0]), static_cast<int64_t>(x.shape[channel_dim]), spatial};
}

// Checks x's shape and group split for the binding `op`; returns x's (N, C, HW).
std::array<int64_t, 3> group_norm_sizes(const py::buffer_info& x, int64_t num_groups, bool channels_last,
                                        const char* op) {
  const auto sizes = batch_channels_spatial(x, channels_last);
  const auto [n, channels, spatial] = sizes;
  if (channels < 1 || num_groups < 1 || channels % num_groups != 0) {
    throw py::value_error(std::string(op) + ": " + std::to_string(channels) + " channels cannot be split into " +
                          std::to_string(num_groups) + " equal groups");
  }
  if (spatial < 1) {  // an empty group has no mean
    throw py::value_error(std::string(op) + ": x has no spatial elements; every group needs at least one");
  }
  check_float_buffer(x, "x", n * channels * spatial);
  return sizes;
}

// A float32 buffer of exactly x's shape (y, grad_y, grad_x).
py::buffer_info like_x(const py::buffer& buffer, const char* name, const py::buffer_info& x, bool writable) {
  py::buffer_info info = float_buffer(buffer, name, x.size, writable);
  if (info.shape != x.shape) {
    throw py::value_error(std::string(name) + ": expected the shape of x");
  }
  return info;
}

// The inputs every group-norm binding reads; the buffer_infos hold the views for as long as the kernel runs.
struct GroupNormInputs {
  py::buffer_info x, weight, bias, scale, shift;
  rdp_core::GroupNormArgs args{};
};

void read_group_norm_inputs(GroupNormInputs& in, const py::buffer& x, const py::object& weight,
                            const py::object& bias, const py::object& scale, const py::object& shift,
                            int64_t num_groups, bool silu, bool channels_last, const char* op) {
  in.x = x.request();
  const auto [n, channels, spatial] = group_norm_sizes(in.x, num_groups, channels_last, op);
  in.weight = optional_float_buffer(weight, "weight", channels);
  in.bias = optional_float_buffer(bias, "bias", channels);
  in.scale = optional_float_buffer(scale, "scale", n * channels);
  in.shift = optional_float_buffer(shift, "shift", n * channels);
  in.args = {static_cast<const float*>(in.x.ptr), static_cast<const float*>(in.weight.ptr),
             static_cast<const float*>(in.bias.ptr), static_cast<const float*>(in.scale.ptr),
             static_cast<const float*>(in.shift.ptr), n, channels, spatial, num_groups, silu, channels_last};
}

float* optional_output(const py::object& buffer, const char* name, int64_t count, py::buffer_info& info) {
  if (buffer.is_none()) return nullptr;
  info = float_buffer(buffer.cast<py::buffer>(), name, count, true);
  return static_cast<float*>(info.ptr);
}

void group_norm_act_fwd(const py::buffer& x, const py::object& weight, const py::object& bias,
                        const py::object& scale, const py::object& shift, const py::buffer& y, const py::buffer& mean,
                        const py::buffer& rstd, int64_t num_groups, double eps, bool silu, bool channels_last) {
  GroupNormInputs in;
  read_group_norm_inputs(in, x, weight, bias, scale, shift, num_groups, silu, channels_last, "group_norm_act_fwd");
  const py::buffer_info y_info = like_x(y, "y", in.x, true);
  const py::buffer_info mean_info = float_buffer(mean, "mean", in.args.n * num_groups, true);
  const py::buffer_info rstd_info = float_buffer(rstd, "rstd", in.args.n * num_groups, true);
  py::gil_scoped_release release;
  rdp_core::group_norm_act_forward(in.args, eps, static_cast<float*>(y_info.ptr), static_cast<float*>(mean_info.ptr),
                                   static_cast<float*>(rstd_info.ptr));
}

void group_norm_silu_fwd(const py::buffer& x, const py::object& weight, const py::object& bias, const py::buffer& y,
                         const py::buffer& mean, const py::buffer& rstd, int64_t num_groups, double eps) {
  group_norm_act_fwd(x, weight, bias, py::none(), py::none(), y, mean, rstd, num_groups, eps, true, false);
}

void group_norm_act_bwd(const py::buffer& x, const py::object& weight, const py::object& bias,
                        const py::object& scale, const py::object& shift, const py::buffer& mean,
                        const py::buffer& rstd, const py::buffer& grad_y, const py::buffer& grad_x,
                        const py::object& grad_weight, const py::object& grad_bias, const py::object& grad_scale,
                        const py::object& grad_shift, int64_t num_groups, bool silu, bool channels_last) {
  GroupNormInputs in;
  read_group_norm_inputs(in, x, weight, bias, scale, shift, num_groups, silu, channels_last, "group_norm_act_bwd");
  const int64_t n = in.args.n, channels = in.args.channels;
  const py::buffer_info mean_info = float_buffer(mean, "mean", n * num_groups, false);
  const py::buffer_info rstd_info = float_buffer(rstd, "rstd", n * num_groups, false);
  const py::buffer_info grad_y_info = like_x(grad_y, "grad_y", in.x, false);
  const py::buffer_info grad_x_info = like_x(grad_x, "grad_x", in.x, true);
  py::buffer_info dw_info, db_info, ds_info, dsh_info;
  float* dw = optional_output(grad_weight, "grad_weight", channels, dw_info);
  float* db = optional_output(grad_bias, "grad_bias", channels, db_info);
  float* ds = optional_output(grad_scale, "grad_scale", n * channels, ds_info);
  float* dsh = optional_output(grad_shift, "grad_shift", n * channels, dsh_info);
  py::gil_scoped_release release;
  rdp_core::group_norm_act_backward(in.args, static_cast<const float*>(mean_info.ptr),
                                    static_cast<const float*>(rstd_info.ptr),
                                    static_cast<const float*>(grad_y_info.ptr), static_cast<float*>(grad_x_info.ptr),
                                    dw, db, ds, dsh);
}

// A (batch, heads, tokens, head_dim) float32 view of `buffer` with any non-negative strides; its shape must be
// `shape` when given (non-empty). The pointer stays valid while the caller holds the returned buffer_info.
template <typename T>
rdp_core::Strided4<T> attention_view(const py::buffer_info& info, const char* name,
                                     const std::vector<py::ssize_t>& shape) {
  if (info.format != py::format_descriptor<float>::format()) {
    throw py::value_error(std::string(name) + ": expected float32 data, got format '" + info.format + "'");
  }
  if (info.ndim != 4 || (!shape.empty() && info.shape != shape)) {
    throw py::value_error(std::string(name) + ": expected shape (batch, heads, tokens, head_dim) equal to q's");
  }
  rdp_core::Strided4<T> view{static_cast<T*>(info.ptr), {0, 0, 0, 0}};
  for (int d = 0; d < 4; ++d) {
    if (info.strides[d] < 0 || info.strides[d] % static_cast<py::ssize_t>(sizeof(float)) != 0) {
      throw py::value_error(std::string(name) + ": strides must be non-negative multiples of 4 bytes");
    }
    view.stride[d] = info.strides[d] / static_cast<py::ssize_t>(sizeof(float));
  }
  return view;
}

rdp_core::AttentionShape attention_shape(const py::buffer_info& q) {
  if (q.ndim != 4 || q.shape[2] < 1 || q.shape[3] < 1) {
    throw py::value_error("q: expected shape (batch, heads, tokens, head_dim) with tokens, head_dim >= 1");
  }
  return {q.shape[0], q.shape[1], q.shape[2], q.shape[3]};
}

void attention_fwd(const py::buffer& q, const py::buffer& k, const py::buffer& v, const py::buffer& out,
                   const py::buffer& lse) {
  const py::buffer_info q_info = q.request(), k_info = k.request(), v_info = v.request();
  const py::buffer_info out_info = out.request(true);
  const rdp_core::AttentionShape shape = attention_shape(q_info);
  const auto q_view = attention_view<const float>(q_info, "q", {});
  const auto k_view = attention_view<const float>(k_info, "k", q_info.shape);
  const auto v_view = attention_view<const float>(v_info, "v", q_info.shape);
  const auto out_view = attention_view<float>(out_info, "out", q_info.shape);
  const py::buffer_info lse_info = float_buffer(lse, "lse", shape.batch * shape.heads * shape.tokens, true);
  py::gil_scoped_release release;
  rdp_core::attention_forward(shape, q_view, k_view, v_view, out_view, static_cast<float*>(lse_info.ptr));
}

void attention_bwd(const py::buffer& q, const py::buffer& k, const py::buffer& v, const py::buffer& out,
                   const py::buffer& grad_out, const py::buffer& lse, const py::buffer& dq, const py::buffer& dk,
                   const py::buffer& dv) {
  const py::buffer_info q_info = q.request(), k_info = k.request(), v_info = v.request();
  const py::buffer_info out_info = out.request(), grad_info = grad_out.request();
  const py::buffer_info dq_info = dq.request(true), dk_info = dk.request(true), dv_info = dv.request(true);
  const rdp_core::AttentionShape shape = attention_shape(q_info);
  const auto& s = q_info.shape;
  const auto q_view = attention_view<const float>(q_info, "q", {});
  const auto k_view = attention_view<const float>(k_info, "k", s);
  const auto v_view = attention_view<const float>(v_info, "v", s);
  const auto out_view = attention_view<const float>(out_info, "out", s);
  const auto grad_view = attention_view<const float>(grad_info, "grad_out", s);
  const auto dq_view = attention_view<float>(dq_info, "dq", s);
  const auto dk_view = attention_view<float>(dk_info, "dk", s);
  const auto dv_view = attention_view<float>(dv_info, "dv", s);
  const py::buffer_info lse_info = float_buffer(lse, "lse", shape.batch * shape.heads * shape.tokens, false);
  py::gil_scoped_release release;
  rdp_core::attention_backward(shape, q_view, k_view, v_view, out_view, grad_view,
                               static_cast<const float*>(lse_info.ptr), dq_view, dk_view, dv_view);
}

// The (n, height, width, channels) of a C-contiguous float32 4-D buffer named `name`.
rdp_core::ConvImageShape image_shape(const py::buffer_info& info, const char* name) {
  if (info.ndim != 4) {
    throw py::value_error(std::string(name) + ": expected a 4-D (N, H, W, C) buffer, got " + std::to_string(info.ndim) +
                          " dimension(s)");
  }
  const rdp_core::ConvImageShape shape{info.shape[0], info.shape[1], info.shape[2], info.shape[3]};
  check_float_buffer(info, name, shape.n * shape.height * shape.width * shape.channels);
  return shape;
}

void winograd_conv3x3(const py::buffer& x, const py::buffer& u, const py::object& bias, const py::buffer& y,
                      bool portable) {
  const py::buffer_info x_info = x.request(), u_info = u.request(), y_info = y.request(true);
  const rdp_core::ConvImageShape x_shape = image_shape(x_info, "x");
  const rdp_core::ConvImageShape y_shape = image_shape(y_info, "y");
  if (y_shape.n != x_shape.n || y_shape.height != x_shape.height || y_shape.width != x_shape.width) {
    throw py::value_error("winograd_conv3x3: y must have x's (N, H, W)");
  }
  const int64_t in_channels = x_shape.channels, out_channels = y_shape.channels;
  if (u_info.ndim != 4 || u_info.shape[0] != rdp_core::kWinogradPoints || u_info.shape[2] != in_channels ||
      u_info.shape[3] != rdp_core::kWinogradPanel || u_info.shape[1] * rdp_core::kWinogradPanel != out_channels) {
    throw py::value_error("winograd_conv3x3: expected u of shape (36, K / 32, C, 32) for x (N, H, W, C) and "
                          "y (N, H, W, K)");
  }
  check_float_buffer(u_info, "u", rdp_core::kWinogradPoints * in_channels * out_channels);
  const py::buffer_info bias_info = optional_float_buffer(bias, "bias", out_channels);
  py::gil_scoped_release release;
  rdp_core::winograd_conv3x3(x_shape, static_cast<const float*>(x_info.ptr), static_cast<const float*>(u_info.ptr),
                             static_cast<const float*>(bias_info.ptr), out_channels, static_cast<float*>(y_info.ptr),
                             portable);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rdp_core's compiled CPU kernels (float32, OpenMP); use them through rdp_core.ops";
  m.def("group_norm_silu_fwd", &group_norm_silu_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("eps"),
        "y = silu(group_norm(x) * weight + bias) for a float32 x of shape (N, C, *spatial); writes y (x's shape) "
        "and the (N * num_groups) per-group mean and 1/std.");
  m.def("group_norm_act_fwd", &group_norm_act_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("num_groups"),
        py::arg("eps"), py::arg("silu"), py::arg("channels_last") = false,
        "y = act((group_norm(x) * weight + bias) * (1 + scale) + shift), act = silu if `silu` else the identity; "
        "weight, bias (C,) and scale, shift (N, C) may be None. x and y are C-contiguous (N, C, *spatial), or "
        "(N, *spatial, C) when channels_last. Writes y and the (N * num_groups) mean and 1/std.");
  m.def("group_norm_act_bwd", &group_norm_act_bwd, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("mean"), py::arg("rstd"), py::arg("grad_y"), py::arg("grad_x"),
        py::arg("grad_weight"), py::arg("grad_bias"), py::arg("grad_scale"), py::arg("grad_shift"),
        py::arg("num_groups"), py::arg("silu"), py::arg("channels_last") = false,
        "The VJP of group_norm_act_fwd given its mean and rstd: writes grad_x, and each parameter gradient whose "
        "buffer is not None (grad_weight, grad_bias (C,); grad_scale, grad_shift (N, C)); layouts as the forward's.");
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        "out = softmax(q k^T / sqrt(head_dim)) v for float32 (batch, heads, tokens, head_dim) buffers of any "
        "non-negative strides (out must not overlap itself or the inputs); writes the contiguous "
        "(batch * heads * tokens) row logsumexp lse for the backward.");
  m.def("attention_bwd", &attention_bwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("grad_out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        "dq, dk, dv of attention given grad_out and the forward's out and lse; strided as attention_fwd.");
  m.def("winograd_conv3x3", &winograd_conv3x3, py::arg("x"), py::arg("u"), py::arg("bias"), py::arg("y"),
        py::arg("portable") = false,
        "y = conv3x3(x) + bias by Winograd F(4x4, 3x3) (stride 1, padding 1): x (N, H, W, C) and y (N, H, W, K) "
        "C-contiguous float32, u the filters packed by rdp_core.ops.conv3x3.winograd_weights as (36, K / 32, C, "
        "32), bias (K,) or None. portable: the portable product kernel even where the AVX-512 one would run.");
}
