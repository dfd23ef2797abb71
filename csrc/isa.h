// Run-time instruction-set selection without -march=native: a function marked RDP_CORE_ISA_CLONES is
// compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, and the loader picks the best
// one the running CPU supports (GNU ifunc). Elsewhere it is compiled once, for the baseline.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define RDP_CORE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif

#ifndef RDP_CORE_ISA_CLONES
#define RDP_CORE_ISA_CLONES
#endif

// Helpers called from a cloned function must be inlined into it, or they run at the baseline ISA.
#if defined(__GNUC__)
#define RDP_CORE_INLINE inline __attribute__((always_inline))
#else
#define RDP_CORE_INLINE inline
#endif
