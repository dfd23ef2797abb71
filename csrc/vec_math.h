// Elementwise math that auto-vectorizes inside the ISA-cloned kernels (see isa.h).
#pragma once

#include "isa.h"

#include <cstdint>
#include <cstring>

namespace rdp_core {

// exp(v) for v in [-87, 88] from plain arithmetic, so that loops calling it vectorize (std::exp does
// not without -ffast-math): 2^n * e^r with |r| <= ln(2)/2 and Cephes' degree-6 polynomial for e^r.
// Relative error below 1e-7 over the whole range (checked against double exp on every float); inputs
// below -87 give ~1e-38 rather than 0, which every caller treats as 0.
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

}  // namespace rdp_core
