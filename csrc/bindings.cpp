// The one pybind11 module of rdp_core: plain buffers in, plain buffers out. The Python side
// (rdp_core/ops) passes zero-copy numpy views of torch tensors and owns every allocation.
#include <pybind11/pybind11.h>

#include <array>
#include <string>

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

// (N, C, HW) of an (N, C, *spatial) buffer: any number of spatial dims, flattened; none means HW = 1.
std::array<int64_t, 3> batch_channels_spatial(const py::buffer_info& x) {
  if (x.ndim < 2) {
    throw py::value_error("x: expected shape (N, C, *spatial), got " + std::to_string(x.ndim) + " dimension(s)");
  }
  int64_t spatial = 1;
  for (py::ssize_t d = 2; d < x.ndim; ++d) spatial *= x.shape[d];
  return {static_cast<int64_t>(x.shape[0]), static_cast<int64_t>(x.shape[1]), spatial};
}

void group_norm_silu_fwd(const py::buffer& x, const py::object& weight, const py::object& bias, const py::buffer& y,
                         const py::buffer& mean, const py::buffer& rstd, int64_t num_groups, double eps) {
  // The buffer_infos hold the buffer views for as long as the kernel reads and writes through them.
  const py::buffer_info x_info = x.request();
  const auto [n, channels, spatial] = batch_channels_spatial(x_info);
  if (channels < 1 || num_groups < 1 || channels % num_groups != 0) {
    throw py::value_error("group_norm_silu_fwd: " + std::to_string(channels) + " channels cannot be split into " +
                          std::to_string(num_groups) + " equal groups");
  }
  if (spatial < 1) {  // an empty group has no mean
    throw py::value_error("group_norm_silu_fwd: x has no spatial elements; every group needs at least one");
  }
  const int64_t count = n * channels * spatial;
  check_float_buffer(x_info, "x", count);
  const py::buffer_info y_info = float_buffer(y, "y", count, true);
  if (y_info.shape != x_info.shape) {
    throw py::value_error("y: expected the shape of x");
  }
  const py::buffer_info mean_info = float_buffer(mean, "mean", n * num_groups, true);
  const py::buffer_info rstd_info = float_buffer(rstd, "rstd", n * num_groups, true);
  const py::buffer_info w_info = optional_float_buffer(weight, "weight", channels);
  const py::buffer_info b_info = optional_float_buffer(bias, "bias", channels);
  py::gil_scoped_release release;
  rdp_core::group_norm_silu_forward(static_cast<const float*>(x_info.ptr), static_cast<const float*>(w_info.ptr),
                                    static_cast<const float*>(b_info.ptr), static_cast<float*>(y_info.ptr),
                                    static_cast<float*>(mean_info.ptr), static_cast<float*>(rstd_info.ptr), n,
                                    channels, spatial, num_groups, eps);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rdp_core's compiled CPU kernels (float32, OpenMP); use them through rdp_core.ops";
  m.def("group_norm_silu_fwd", &group_norm_silu_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("eps"),
        "y = silu(group_norm(x) * weight + bias) for a float32 x of shape (N, C, *spatial); writes y (x's shape) "
        "and the (N * num_groups) per-group mean and 1/std.");
}
