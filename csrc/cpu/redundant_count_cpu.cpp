// CPU kernel: redundancy-normalised counts, per image or per cell x cell block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../fastcount_ops.h"

namespace fastcount {
namespace {

// Sum of one row segment in the canonical lane order (see fastcount_ops.h):
// the same additions a CUDA warp performs, so both devices agree bit for bit.
template <typename T>
double segment_sum(const T* __restrict__ p, int64_t len) {
  double lane[kLanes] = {};
  int64_t x = 0;
  for (; x + kLanes <= len; x += kLanes) {
    for (int k = 0; k < kLanes; ++k) lane[k] += to_double(p[x + k]);
  }
  for (int k = 0; x + k < len; ++k) lane[k] += to_double(p[x + k]);
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int k = 0; k < half; ++k) lane[k] = lane[k] + lane[k + half];
  }
  return lane[0];
}

// Two levels, both in a fixed order independent of the thread count:
// (1) per row and cell column, the lane-order segment sum; (2) per cell, the
// rows' segment sums added top to bottom, then divided by (r/s)^2.
template <typename T>
void redundant_count_kernel(const T* map, double* out, int64_t n_maps, int64_t h, int64_t w,
                            int64_t cw, int64_t chh, double redundancy) {
  const int64_t nseg = (w + cw - 1) / cw, ncell_rows = (h + chh - 1) / chh;
  std::vector<double> seg(static_cast<size_t>(n_maps * h * nseg));
  at::parallel_for(0, n_maps * h, grain_for(w), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const T* p = map + row * w;
      for (int64_t j = 0; j < nseg; ++j) {
        const int64_t x0 = j * cw;
        seg[row * nseg + j] = segment_sum(p + x0, std::min(cw, w - x0));
      }
    }
  });
  at::parallel_for(0, n_maps * ncell_rows, grain_for(chh * nseg), [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(nseg);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = c / ncell_rows, i = c % ncell_rows;
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t y1 = std::min((i + 1) * chh, h);
      for (int64_t y = i * chh; y < y1; ++y) {
        const double* s = seg.data() + (n * h + y) * nseg;
        for (int64_t j = 0; j < nseg; ++j) acc[j] += s[j];
      }
      double* o = out + c * nseg;
      for (int64_t j = 0; j < nseg; ++j) o[j] = acc[j] / redundancy;
    }
  });
}

at::Tensor redundant_count_cpu(const at::Tensor& count_map, int64_t patch_size, int64_t stride,
                               int64_t cell) {
  int64_t n_maps, h, w;
  const auto shape = check_count_map(count_map, patch_size, stride, cell, n_maps, h, w);
  auto out = at::empty(shape, count_map.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  const double redundancy = static_cast<double>((patch_size / stride) * (patch_size / stride));
  if (h == 0 || w == 0) return out.fill_(0.0);
  auto map = count_map.contiguous();
  // cell = 0 is one block covering the whole map
  const int64_t cw = cell > 0 ? cell : w, chh = cell > 0 ? cell : h;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, map.scalar_type(), "redundant_count_cpu", [&] {
    redundant_count_kernel<scalar_t>(map.const_data_ptr<scalar_t>(), out.data_ptr<double>(), n_maps,
                                     h, w, cw, chh, redundancy);
  });
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("redundant_count", &fastcount::redundant_count_cpu); }
