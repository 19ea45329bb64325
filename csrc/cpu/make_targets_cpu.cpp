// CPU kernels: count-map targets from dense dot maps and from point lists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../fastcount_ops.h"

namespace fastcount {
namespace {

// Horizontal pass of one output row: box sums of `v` (width values) over the
// window of every output column, by the canonical chunked two-prefix scheme.
// The top- and bottom-edge running sums of a chunk make the same additions
// from the same start, so they are read off one prefix array (relative to the
// chunk start). A prefix is a serial dependency chain, so kGroup chunks are
// scanned interleaved (independent chains, same additions per chunk); the
// differences are a vectorisable loop.
constexpr int kGroup = 4;

inline int64_t row_scratch_size(int64_t r, int64_t s) {
  return kGroup * (std::max(kSpan, s) + r + 1);
}

template <typename acc_t>
void emit_chunk(const acc_t* q, int64_t base, int64_t x0, int64_t x1, int64_t width, int64_t r,
                int64_t s, float* out) {
  // interior outputs (window not clipped by the row ends) branch-free; the
  // clipped ones at either end take the general form
  const int64_t a = std::min(std::max(x0, (r + s - 1) / s), x1);
  const int64_t b = std::max(std::min(x1, width / s + 1), a);
  for (int64_t xo = x0; xo < a; ++xo) {
    out[xo] = finish_acc<acc_t>(q[win_hi(xo, s, width) - base] - q[win_lo(xo, r, s) - base]);
  }
  const acc_t* qh = q - base;
  const acc_t* ql = q - base - r;
  for (int64_t xo = a; xo < b; ++xo) out[xo] = finish_acc<acc_t>(qh[xo * s] - ql[xo * s]);
  for (int64_t xo = b; xo < x1; ++xo) {
    out[xo] = finish_acc<acc_t>(q[win_hi(xo, s, width) - base] - q[win_lo(xo, r, s) - base]);
  }
}

template <typename acc_t>
void row_box_sums(const acc_t* v, int64_t width, int64_t r, int64_t s, int64_t wo, float* out,
                  acc_t* q) {
  const int64_t cc = chunk_outputs(s), n_chunks = (wo + cc - 1) / cc;
  for (int64_t c0 = 0; c0 < n_chunks; c0 += kGroup) {
    const int g = static_cast<int>(std::min<int64_t>(kGroup, n_chunks - c0));
    int64_t base[kGroup], len[kGroup], x0[kGroup], x1[kGroup];
    acc_t* qc[kGroup];
    acc_t run[kGroup];
    acc_t* qp = q;
    int64_t common = std::numeric_limits<int64_t>::max();
    for (int i = 0; i < g; ++i) {
      x0[i] = (c0 + i) * cc;
      x1[i] = std::min(x0[i] + cc, wo);
      base[i] = win_lo(x0[i], r, s);
      len[i] = win_hi(x1[i] - 1, s, width) - base[i];
      qc[i] = qp;
      qp += len[i] + 1;
      qc[i][0] = run[i] = acc_t(0);
      common = std::min(common, len[i]);
    }
    int64_t k = 0;
    if (g == kGroup) {
      for (; k < common; ++k) {
        for (int i = 0; i < kGroup; ++i) qc[i][k + 1] = run[i] += v[base[i] + k];
      }
    }
    for (int i = 0; i < g; ++i) {
      for (int64_t j = k; j < len[i]; ++j) qc[i][j + 1] = run[i] += v[base[i] + j];
      emit_chunk(qc[i], base[i], x0[i], x1[i], width, r, s, out);
    }
  }
}

template <typename in_t, typename acc_t>
void add_row(acc_t* __restrict__ dst, const in_t* __restrict__ src, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] += load_acc<acc_t>(src[x]);
}
template <typename in_t, typename acc_t>
void sub_row(acc_t* __restrict__ dst, const in_t* __restrict__ src, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] -= load_acc<acc_t>(src[x]);
}
template <typename in_t, typename acc_t>
void slide_row(acc_t* __restrict__ dst, const in_t* __restrict__ enter, const in_t* __restrict__ leave,
               int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] += load_acc<acc_t>(enter[x]) - load_acc<acc_t>(leave[x]);
}

// One task = one image x one chunk of output rows. The vertical box sums of a
// row come from two running prefix rows (top and bottom window edge) restarted
// at the chunk's first input row; the scratch rows are allocated once per call
// of the parallel body, never per pixel.
template <typename in_t, typename acc_t>
void make_targets_kernel(const in_t* dots, float* out, int64_t n_images, int64_t h, int64_t w,
                         int64_t r, int64_t s) {
  const int64_t ho = out_side(h, r, s), wo = out_side(w, r, s);
  const int64_t ch = chunk_outputs(s);
  const int64_t n_chunks = (ho + ch - 1) / ch;
  at::parallel_for(0, n_images * n_chunks, grain_for((ch * s + r) * w), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top(w), bottom(w), v(w), q(row_scratch_size(r, s));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / n_chunks, y0 = (task % n_chunks) * ch;
      const int64_t y1 = std::min(y0 + ch, ho);
      const in_t* img = dots + n * h * w;
      const int64_t base = win_lo(y0, r, s);
      std::fill(top.begin(), top.end(), acc_t(0));
      std::fill(bottom.begin(), bottom.end(), acc_t(0));
      std::fill(v.begin(), v.end(), acc_t(0));
      int64_t hy = base, ly = base;
      for (int64_t yo = y0; yo < y1; ++yo) {
        const int64_t hi = win_hi(yo, s, h), lo = win_lo(yo, r, s);
        if constexpr (!std::is_same_v<acc_t, double>) {
          // Integers: wrapping sums are exact in any order, so slide one row
          // (add the entering row, drop the leaving one) in a single pass.
          for (; hy < hi && ly < lo; ++hy, ++ly) slide_row(v.data(), img + hy * w, img + ly * w, w);
          for (; hy < hi; ++hy) add_row(v.data(), img + hy * w, w);
          for (; ly < lo; ++ly) sub_row(v.data(), img + ly * w, w);
        } else {
          if (hi - hy == 1 && lo - ly == 1) {  // stride 1 in steady state: one fused pass
            const in_t* a = img + hy * w;
            const in_t* b = img + ly * w;
            for (int64_t x = 0; x < w; ++x) {
              top[x] += load_acc<acc_t>(a[x]);
              bottom[x] += load_acc<acc_t>(b[x]);
              v[x] = top[x] - bottom[x];
            }
            ++hy, ++ly;
          } else {
            for (; hy < hi; ++hy) add_row(top.data(), img + hy * w, w);
            for (; ly < lo; ++ly) add_row(bottom.data(), img + ly * w, w);
            for (int64_t x = 0; x < w; ++x) v[x] = top[x] - bottom[x];
          }
        }
        row_box_sums(v.data(), w, r, s, wo, out + (n * ho + yo) * wo, q.data());
      }
    }
  });
}

at::Tensor make_targets_cpu(const at::Tensor& dots_in, int64_t patch_size, int64_t stride) {
  int64_t n_images, h, w;
  const auto shape = check_dots(dots_in, patch_size, stride, n_images, h, w);
  auto out = at::empty(shape, dots_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  auto dots = dots_in.contiguous();
  if (dots.scalar_type() == at::kBool) dots = dots.view(at::kByte);
  const bool narrow = narrow_accumulator_ok(dots.scalar_type(), patch_size);
  float* o = out.data_ptr<float>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dots.scalar_type(), "make_targets_cpu", [&] {
    const scalar_t* d = dots.const_data_ptr<scalar_t>();
    if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                  std::is_same_v<scalar_t, at::BFloat16>) {
      make_targets_kernel<scalar_t, double>(d, o, n_images, h, w, patch_size, stride);
    } else if (narrow) {
      make_targets_kernel<scalar_t, uint32_t>(d, o, n_images, h, w, patch_size, stride);
    } else {
      make_targets_kernel<scalar_t, uint64_t>(d, o, n_images, h, w, patch_size, stride);
    }
  });
  return out;
}

// Points: each point adds 1 to an (r/s) x (r/s) block of the output. Mark the
// block corners in a difference array on the output grid, then two prefix
// passes; cost O(N + output), never a dense H x W dot map.
template <typename cnt_t>
void points_kernel(const int64_t* pts, int64_t n, int64_t h, int64_t w, int64_t r, int64_t s,
                   cnt_t* d, int64_t ho, int64_t wo) {
  for (int64_t p = 0; p < n; ++p) {
    const int64_t i = pts[2 * p], j = pts[2 * p + 1];
    if (i < 0 || i >= h || j < 0 || j >= w) raise_bad_point(p, i, j, h, w);
    // output rows (cols) whose window contains i (j): i/s+1 .. (i+r)/s, all < ho (wo)
    const int64_t a = i / s + 1, b = (i + r) / s + 1, c = j / s + 1, e = (j + r) / s + 1;
    d[a * wo + c] += 1;
    if (e < wo) d[a * wo + e] -= 1;
    if (b < ho) {
      d[b * wo + c] -= 1;
      if (e < wo) d[b * wo + e] += 1;
    }
  }
  // column prefix: rows in order, vectorised across columns, parallel over column blocks
  at::parallel_for(0, wo, std::max<int64_t>(64, grain_for(ho)), [&](int64_t x0, int64_t x1) {
    for (int64_t y = 1; y < ho; ++y) {
      cnt_t* __restrict__ cur = d + y * wo;
      const cnt_t* __restrict__ prev = d + (y - 1) * wo;
      for (int64_t x = x0; x < x1; ++x) cur[x] += prev[x];
    }
  });
}

at::Tensor make_targets_from_points_cpu(const at::Tensor& points_in, int64_t height, int64_t width,
                                        int64_t patch_size, int64_t stride) {
  const auto shape = check_points(points_in, height, width, patch_size, stride);
  const int64_t ho = shape[0], wo = shape[1];
  const auto points = points_in.contiguous();
  const int64_t n = points.size(0);
  const int64_t* pts = points.const_data_ptr<int64_t>();
  if (n < std::numeric_limits<int32_t>::max()) {
    // int32 counts (< N) fit the float32 output's storage: build in place, then
    // convert each element where it lies (memcpy keeps the type punning defined).
    auto cnt = at::zeros(shape, points.options().dtype(at::kInt));
    int32_t* d = cnt.data_ptr<int32_t>();
    points_kernel<int32_t>(pts, n, height, width, patch_size, stride, d, ho, wo);
    at::parallel_for(0, ho, grain_for(wo), [&](int64_t y0, int64_t y1) {
      for (int64_t y = y0; y < y1; ++y) {
        int32_t acc = 0;
        char* row = reinterpret_cast<char*>(d + y * wo);
        for (int64_t x = 0; x < wo; ++x) {
          int32_t v;
          std::memcpy(&v, row + 4 * x, 4);
          acc += v;
          const float f = static_cast<float>(acc);
          std::memcpy(row + 4 * x, &f, 4);
        }
      }
    });
    return cnt.view(at::kFloat);
  }
  auto cnt = at::zeros(shape, points.options().dtype(at::kLong));
  int64_t* d = cnt.data_ptr<int64_t>();
  points_kernel<int64_t>(pts, n, height, width, patch_size, stride, d, ho, wo);
  auto out = at::empty(shape, points.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, ho, grain_for(wo), [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      int64_t acc = 0;
      for (int64_t x = 0; x < wo; ++x) o[y * wo + x] = static_cast<float>(acc += d[y * wo + x]);
    }
  });
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) {
  m.impl("make_targets", &fastcount::make_targets_cpu);
  m.impl("make_targets_from_points", &fastcount::make_targets_from_points_cpu);
}
