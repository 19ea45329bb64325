// Shared by the hand-vectorised CPU kernels (spectral_mix, pointwise_mlp, winograd):
// GCC/Clang vector types, their helpers, and the run-time choice of instruction set.
//
// The build has no -march flag: each kernel compiles its hot loop three times, under
// target("avx512f"), target("avx2,fma") and the baseline (SSE2 on x86-64), and picks one
// per call with pick_isa(). A v16 is one zmm register under AVX-512, a v8 one ymm under
// AVX2, a v4 one xmm in the baseline (wider-than-native generic vectors compile to poor
// code, hence one type per variant). The helpers are always inlined into their target
// callers, so the ABI of passing wide vectors by value (-Wpsabi) never applies.
#pragma once

#if !defined(__GNUC__)
#error "the fastcount CPU kernels need GCC or Clang (vector extensions, target attributes)"
#endif

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#define FC_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) || defined(__i386__)
#define FC_HAVE_X86_VARIANTS 1
#endif

namespace fastcount {
namespace simd {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

template <typename V>
constexpr int lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}
template <typename V>
FC_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FC_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <>
FC_INLINE float load<float>(const float* p) {
  return *p;
}
template <>
FC_INLINE void store<float>(float* p, float v) {
  *p = v;
}

// One float in every lane. (`V{} + f` compiles to an add and a broadcast; the forms that
// are a pure broadcast to the compiler, a brace list or the same without signed zeros,
// go through the stack with GCC's generic vectors and ran 5-10x slower, measured.)
template <typename V>
FC_INLINE V splat(float f) {
  return V{} + f;
}

// *p in every lane, as one load-broadcast instruction on AVX2/AVX-512 (inline asm: GCC
// builds `splat(*p)` as a scalar load, an add of 0 and a register broadcast).
template <typename V>
FC_INLINE V splat_load(const float* p) {
#ifdef FC_HAVE_X86_VARIANTS
  if constexpr (lanes<V>() == 16) {
    V r;
    asm("vbroadcastss %1, %0" : "=v"(r) : "m"(*p));
    return r;
  } else if constexpr (lanes<V>() == 8) {
    V r;
    asm("vbroadcastss %1, %0" : "=x"(r) : "m"(*p));
    return r;
  }
#endif
  return splat<V>(*p);
}

// LeakyReLU lane by lane, exactly F.leaky_relu: max(v, 0) + slope * min(v, 0).
template <typename V>
FC_INLINE V leaky(V v, float slope) {
  const V zero = V{};
  return (v > zero ? v : zero) + (v < zero ? v : zero) * splat<V>(slope);
}

enum class Isa { avx512, avx2, baseline };

// The widest instruction set this CPU runs, or the one the environment variable `env`
// names ("avx512", "avx2", "baseline"; for tests and benchmarks of the other code
// paths; read on every call).
inline Isa pick_isa(const char* env) {
  const char* want = std::getenv(env);
  const std::string name = want == nullptr ? "" : want;
  TORCH_CHECK_VALUE(name.empty() || name == "avx512" || name == "avx2" || name == "baseline", env,
                    " must be avx512, avx2 or baseline, got '", name, "'");
#ifdef FC_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK_VALUE(name != "avx512" || avx512, env, "=avx512 but this CPU lacks AVX-512F");
  TORCH_CHECK_VALUE(name != "avx2" || avx2, env, "=avx2 but this CPU lacks AVX2/FMA");
  if (avx512 && (name.empty() || name == "avx512")) return Isa::avx512;
  if (avx2 && (name.empty() || name == "avx2")) return Isa::avx2;
#else
  TORCH_CHECK_VALUE(name.empty() || name == "baseline", env, "=", name,
                    " is only available on x86-64 builds with GCC or Clang");
#endif
  return Isa::baseline;
}

// The variant of a kernel for the instruction set pick_isa(env) chooses. Builds without
// the x86 variants pass `base` for all three.
template <typename T>
T by_isa(const char* env, T base, T avx2, T avx512) {
  switch (pick_isa(env)) {
    case Isa::avx512:
      return avx512;
    case Isa::avx2:
      return avx2;
    default:
      return base;
  }
}

}  // namespace simd
}  // namespace fastcount
