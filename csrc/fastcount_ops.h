// Shared by the CPU (.cpp) and CUDA (.cu) implementations of the fastcount ops.
//
// The CPU and CUDA kernels follow one canonical decomposition (chunk sizes,
// lane layout, order of additions) defined here, so that for float inputs both
// devices perform the same IEEE additions in the same order and return
// bit-identical results, independent of thread or block counts. Integer inputs
// are summed in modular (wrapping) integer arithmetic, which is exact in any
// order, so their kernels are free to take faster orders (the CPU slides).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline
#endif

namespace fastcount {

// --------------------------------------------------------------- geometry
// Output row `y` (stride s, window r) sums input rows [win_lo(y), win_hi(y)).
FC_HD int64_t win_lo(int64_t y, int64_t r, int64_t s) {
  const int64_t v = y * s - r;
  return v < 0 ? 0 : v;
}
FC_HD int64_t win_hi(int64_t y, int64_t s, int64_t n) {
  const int64_t v = y * s;
  return v > n ? n : v;
}
FC_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FC_HD int64_t out_side(int64_t n, int64_t r, int64_t s) { return (n + r + s - 1) / s; }

// Box sums run as two running prefix sums (one at the window's top edge, one at
// its bottom edge) restarted at the start of every chunk of output rows/cols.
// Restarting bounds rounding for float inputs, lets chunks run in parallel, and
// a window over zeros is exactly 0 (both prefixes saw the same additions).
// A chunk covers about kSpan input rows (columns); the constant is part of the
// canonical order, so it is fixed, not tuned per device or thread count.
constexpr int64_t kSpan = 256;
FC_HD int64_t chunk_outputs(int64_t s) { return kSpan / s > 0 ? kSpan / s : 1; }

// redundant_count: each row segment is summed by 32 lanes (lane k takes
// elements k, k+32, ... in order), then the lanes are combined by halving
// (0+16, 0+8, ...), which is what a CUDA warp's xor-butterfly leaves in lane 0.
constexpr int kLanes = 32;

// CPU: split work across threads only in pieces of at least ~1M elements, so
// small inputs (a training batch) do not pay thread wake-ups on a busy machine.
constexpr int64_t kMinParallelWork = int64_t(1) << 20;
FC_HD int64_t grain_for(int64_t work_per_item) {
  const int64_t g = kMinParallelWork / (work_per_item > 1 ? work_per_item : 1);
  return g > 1 ? g : 1;
}

// --------------------------------------------------------------- accumulators
// Integer dot maps accumulate in unsigned (wrapping) arithmetic: differences of
// prefix sums are exact modulo 2^bits, hence exact whenever the true box sum
// fits the signed type. 8/16-bit inputs use 32 bits when r*r*max|value| fits
// (twice the SIMD lanes), everything else 64 bits; floats use double.
template <typename acc_t>
struct Signed {
  using type = acc_t;
};
template <>
struct Signed<uint32_t> {
  using type = int32_t;
};
template <>
struct Signed<uint64_t> {
  using type = int64_t;
};

template <typename acc_t, typename in_t>
FC_HD acc_t load_acc(in_t v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    if constexpr (std::is_same_v<in_t, c10::Half> || std::is_same_v<in_t, c10::BFloat16>) {
      return static_cast<double>(static_cast<float>(v));
    } else {
      return static_cast<double>(v);
    }
  } else if constexpr (std::is_same_v<in_t, bool>) {
    return static_cast<acc_t>(v ? 1 : 0);
  } else {
    // sign-extend first, then wrap into the unsigned accumulator
    return static_cast<acc_t>(static_cast<typename Signed<acc_t>::type>(v));
  }
}

template <typename acc_t>
FC_HD float finish_acc(acc_t v) {
  return static_cast<float>(static_cast<typename Signed<acc_t>::type>(v));
}

template <typename T>
constexpr bool is_float_like() {
  return std::is_floating_point_v<T> || std::is_same_v<T, c10::Half> ||
         std::is_same_v<T, c10::BFloat16>;
}

template <typename T>
FC_HD double to_double(T v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return static_cast<double>(static_cast<float>(v));
  } else {
    return static_cast<double>(v);
  }
}

// --------------------------------------------------------------- validation (checks.cpp)
// Each raises ValueError/TypeError (TORCH_CHECK_VALUE/TYPE) naming the argument.
void check_geometry(int64_t patch_size, int64_t stride);
// Validates dots and returns the output shape; sets n_images, height, width.
std::vector<int64_t> check_dots(const at::Tensor& dots, int64_t patch_size, int64_t stride,
                                int64_t& n_images, int64_t& height, int64_t& width);
// True when 32-bit wrapping accumulators are exact for this dtype and window.
bool narrow_accumulator_ok(at::ScalarType dtype, int64_t patch_size);
std::vector<int64_t> check_points(const at::Tensor& points, int64_t height, int64_t width,
                                  int64_t patch_size, int64_t stride);
// Raises ValueError naming the first point outside [0,height) x [0,width) (host data).
void raise_bad_point(int64_t index, int64_t row, int64_t col, int64_t height, int64_t width);
std::vector<int64_t> check_count_map(const at::Tensor& count_map, int64_t patch_size,
                                     int64_t stride, int64_t cell, int64_t& n_maps,
                                     int64_t& height, int64_t& width);

}  // namespace fastcount
