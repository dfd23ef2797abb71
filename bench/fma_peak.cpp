// Peak float32 FMA throughput of this CPU: independent AVX-512 FMA chains on every OpenMP thread.
//   g++ -O3 -mavx512f -fopenmp bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak   (x86-64 with AVX-512)
// The ceiling the CPU convolutions are measured against in bench/RESULTS.md (oneDNN runs them as FMA loops).
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>

int main() {
  constexpr long kIters = 200000000;
  constexpr int kChains = 12;  // enough independent FMAs to cover latency x ports
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    float sink = 0.0f;
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : sink)
    {
      __m512 acc[kChains];
      for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(1.0f + j * 1e-3f);
      const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
      for (long i = 0; i < kIters / kChains; ++i) {
        for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
      }
      for (int j = 0; j < kChains; ++j) sink += _mm512_reduce_add_ps(acc[j]);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double flops = 2.0 * 16 * (kIters / kChains) * kChains * omp_get_max_threads();
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 42.0f) std::printf(" ");
  }
  std::printf("%d threads: %.1f GFLOP/s float32 FMA peak\n", omp_get_max_threads(), best / 1e9);
}
