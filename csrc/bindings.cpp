// The one pybind11 module of rdp_core: plain buffers in, plain buffers out. The Python side
// (rdp_core/ops) passes zero-copy numpy views of torch tensors and owns every allocation.
#include <pybind11/pybind11.h>

#include <string>

#include "group_norm_silu.h"

namespace py = pybind11;

namespace {

// A C-contiguous float32 buffer of exactly `count` elements, or a ValueError naming `name`.
py::buffer_info float_buffer(const py::buffer& buffer, const char* name, int64_t count, bool writable) {
  py::buffer_info info = buffer.request(writable);
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
  return info;
}

// Same for a buffer that may be None (an empty buffer_info, whose ptr is nullptr).
py::buffer_info optional_float_buffer(const py::object& buffer, const char* name, int64_t count) {
  if (buffer.is_none()) return py::buffer_info();
  return float_buffer(buffer.cast<py::buffer>(), name, count, false);
}

void group_norm_silu_fwd(const py::buffer& x, const py::object& weight, const py::object& bias, const py::buffer& y,
                         const py::buffer& mean, const py::buffer& rstd, int64_t n, int64_t channels,
                         int64_t spatial, int64_t groups, double eps) {
  if (n < 0 || channels < 1 || spatial < 1 || groups < 1 || channels % groups != 0) {
    throw py::value_error("group_norm_silu_fwd: need n >= 0, spatial >= 1 and channels a positive multiple of groups");
  }
  const int64_t count = n * channels * spatial;
  // The buffer_infos hold the buffer views for as long as the kernel reads and writes through them.
  const py::buffer_info x_info = float_buffer(x, "x", count, false);
  const py::buffer_info y_info = float_buffer(y, "y", count, true);
  const py::buffer_info mean_info = float_buffer(mean, "mean", n * groups, true);
  const py::buffer_info rstd_info = float_buffer(rstd, "rstd", n * groups, true);
  const py::buffer_info w_info = optional_float_buffer(weight, "weight", channels);
  const py::buffer_info b_info = optional_float_buffer(bias, "bias", channels);
  py::gil_scoped_release release;
  rdp_core::group_norm_silu_forward(static_cast<const float*>(x_info.ptr), static_cast<const float*>(w_info.ptr),
                                    static_cast<const float*>(b_info.ptr), static_cast<float*>(y_info.ptr),
                                    static_cast<float*>(mean_info.ptr), static_cast<float*>(rstd_info.ptr), n,
                                    channels, spatial, groups, eps);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rdp_core's compiled CPU kernels (float32, OpenMP); use them through rdp_core.ops";
  m.def("group_norm_silu_fwd", &group_norm_silu_fwd, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("n"), py::arg("channels"), py::arg("spatial"), py::arg("groups"),
        py::arg("eps"),
        "y = silu(group_norm(x) * weight + bias) over (n, channels, spatial) float32 buffers; writes y and the "
        "per-group mean and 1/std.");
}
