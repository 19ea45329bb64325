// CUDA kernels: count-map targets from dense dot maps and from point lists.
//
// Dense maps take one pass per axis: a vertical pass with one thread per
// column (coalesced across the warp, running sums down the rows) into an
// intermediate of vertical box sums, then a horizontal pass with one thread per
// chunk of output columns. Both follow the canonical chunked two-prefix order
// of fastcount_ops.h, so results equal the CPU kernels bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../fastcount_ops.h"

namespace fastcount {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

int64_t blocks_for(int64_t n, int64_t cap = int64_t(1) << 20) {
  return imin(imin((n + kThreads - 1) / kThreads, cap), std::numeric_limits<int32_t>::max());
}

template <typename in_t, typename acc_t>
__global__ void vertical_kernel(const in_t* __restrict__ dots, acc_t* __restrict__ v,
                                int64_t n_images, int64_t h, int64_t w, int64_t r, int64_t s,
                                int64_t ho, int64_t n_chunks) {
  const int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (x >= w) return;
  const int64_t ch = chunk_outputs(s);
  for (int64_t n = blockIdx.z; n < n_images; n += gridDim.z) {
    const in_t* col = dots + n * h * w + x;
    for (int64_t c = blockIdx.y; c < n_chunks; c += gridDim.y) {
      const int64_t y0 = c * ch, y1 = imin(y0 + ch, ho);
      const int64_t base = win_lo(y0, r, s);
      acc_t top = 0, bottom = 0;
      int64_t hy = base, ly = base;
      for (int64_t yo = y0; yo < y1; ++yo) {
        const int64_t hi = win_hi(yo, s, h), lo = win_lo(yo, r, s);
        for (; hy < hi; ++hy) top += load_acc<acc_t>(col[hy * w]);
        for (; ly < lo; ++ly) bottom += load_acc<acc_t>(col[ly * w]);
        v[(n * ho + yo) * w + x] = top - bottom;
      }
    }
  }
}

template <typename acc_t>
__global__ void horizontal_kernel(const acc_t* __restrict__ v, float* __restrict__ out,
                                  int64_t rows, int64_t w, int64_t r, int64_t s, int64_t wo,
                                  int64_t n_cchunks) {
  const int64_t cc = chunk_outputs(s);
  const int64_t total = rows * n_cchunks;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / n_cchunks, x0 = (t % n_cchunks) * cc, x1 = imin(x0 + cc, wo);
    const acc_t* vr = v + row * w;
    float* o = out + row * wo;
    const int64_t base = win_lo(x0, r, s);
    acc_t top = 0, bottom = 0;
    int64_t hx = base, lx = base;
    for (int64_t xo = x0; xo < x1; ++xo) {
      const int64_t hi = win_hi(xo, s, w), lo = win_lo(xo, r, s);
      for (; hx < hi; ++hx) top += vr[hx];
      for (; lx < lo; ++lx) bottom += vr[lx];
      o[xo] = finish_acc<acc_t>(top - bottom);
    }
  }
}

template <typename acc_t>
at::ScalarType storage_type() {
  if constexpr (std::is_same_v<acc_t, double>) return at::kDouble;
  else if constexpr (sizeof(acc_t) == 4) return at::kInt;
  else return at::kLong;
}

template <typename in_t, typename acc_t>
void launch_make_targets(const at::Tensor& dots, at::Tensor& out, int64_t n_images, int64_t h,
                         int64_t w, int64_t r, int64_t s) {
  const int64_t ho = out_side(h, r, s), wo = out_side(w, r, s);
  const int64_t ch = chunk_outputs(s), n_chunks = (ho + ch - 1) / ch;
  const int64_t n_cchunks = (wo + ch - 1) / ch;
  auto v = at::empty({n_images * ho * w}, dots.options().dtype(storage_type<acc_t>()));
  acc_t* vp = reinterpret_cast<acc_t*>(v.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid1(static_cast<unsigned>((w + kThreads - 1) / kThreads),
                   static_cast<unsigned>(imin(n_chunks, kMaxGrid)),
                   static_cast<unsigned>(imin(n_images, kMaxGrid)));
  vertical_kernel<in_t, acc_t><<<grid1, kThreads, 0, stream>>>(
      dots.const_data_ptr<in_t>(), vp, n_images, h, w, r, s, ho, n_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = n_images * ho * n_cchunks;
  horizontal_kernel<acc_t><<<static_cast<unsigned>(blocks_for(total)), kThreads, 0, stream>>>(
      vp, out.data_ptr<float>(), n_images * ho, w, r, s, wo, n_cchunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor make_targets_cuda(const at::Tensor& dots_in, int64_t patch_size, int64_t stride) {
  int64_t n_images, h, w;
  const auto shape = check_dots(dots_in, patch_size, stride, n_images, h, w);
  c10::cuda::CUDAGuard guard(dots_in.device());
  auto out = at::empty(shape, dots_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  auto dots = dots_in.contiguous();
  if (dots.scalar_type() == at::kBool) dots = dots.view(at::kByte);
  const bool narrow = narrow_accumulator_ok(dots.scalar_type(), patch_size);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dots.scalar_type(), "make_targets_cuda", [&] {
    if constexpr (is_float_like<scalar_t>()) {
      launch_make_targets<scalar_t, double>(dots, out, n_images, h, w, patch_size, stride);
    } else if (narrow) {
      launch_make_targets<scalar_t, uint32_t>(dots, out, n_images, h, w, patch_size, stride);
    } else {
      launch_make_targets<scalar_t, uint64_t>(dots, out, n_images, h, w, patch_size, stride);
    }
  });
  return out;
}

// ------------------------------------------------------------------ points
// Difference array on the output grid (atomic corner marks), a column prefix
// (one thread per column, coalesced), then a row prefix (one warp per row,
// warp-shuffle scan) that writes float32. Integer sums: exact in any order.

__device__ __forceinline__ void atomic_add_cnt(int32_t* p, int32_t v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add_cnt(int64_t* p, int64_t v) {
  // two's complement: adding 2^64 - 1 is subtracting 1
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

template <typename cnt_t>
__global__ void scatter_points_kernel(const int64_t* __restrict__ pts, int64_t n, int64_t r,
                                      int64_t s, cnt_t* __restrict__ d, int64_t ho, int64_t wo) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = pts[2 * p], j = pts[2 * p + 1];
    const int64_t a = i / s + 1, b = (i + r) / s + 1, c = j / s + 1, e = (j + r) / s + 1;
    atomic_add_cnt(d + a * wo + c, cnt_t(1));
    if (e < wo) atomic_add_cnt(d + a * wo + e, cnt_t(-1));
    if (b < ho) {
      atomic_add_cnt(d + b * wo + c, cnt_t(-1));
      if (e < wo) atomic_add_cnt(d + b * wo + e, cnt_t(1));
    }
  }
}

template <typename cnt_t>
__global__ void column_prefix_kernel(cnt_t* __restrict__ d, int64_t ho, int64_t wo) {
  const int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (x >= wo) return;
  cnt_t run = 0;
  for (int64_t y = 0; y < ho; ++y) d[y * wo + x] = run += d[y * wo + x];
}

template <typename cnt_t>
__global__ void row_prefix_kernel(const cnt_t* __restrict__ d, float* __restrict__ out, int64_t ho,
                                  int64_t wo) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x / 32;
  for (int64_t y = blockIdx.x * warps + threadIdx.x / 32; y < ho; y += int64_t(gridDim.x) * warps) {
    cnt_t carry = 0;
    for (int64_t x0 = 0; x0 < wo; x0 += 32) {
      const int64_t x = x0 + lane;
      cnt_t v = x < wo ? d[y * wo + x] : cnt_t(0);
      for (int off = 1; off < 32; off <<= 1) {
        const cnt_t t = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += t;
      }
      v += carry;
      if (x < wo) out[y * wo + x] = static_cast<float>(v);
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
  }
}

template <typename cnt_t>
void launch_points(const at::Tensor& points, at::Tensor& out, int64_t r, int64_t s) {
  const int64_t n = points.size(0), ho = out.size(0), wo = out.size(1);
  auto cnt = at::zeros({ho, wo}, points.options().dtype(sizeof(cnt_t) == 4 ? at::kInt : at::kLong));
  cnt_t* d = reinterpret_cast<cnt_t*>(cnt.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    scatter_points_kernel<cnt_t><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
        points.const_data_ptr<int64_t>(), n, r, s, d, ho, wo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  column_prefix_kernel<cnt_t><<<static_cast<unsigned>((wo + kThreads - 1) / kThreads), kThreads, 0,
                                stream>>>(d, ho, wo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t warps = kThreads / 32;
  row_prefix_kernel<cnt_t><<<static_cast<unsigned>(imin((ho + warps - 1) / warps, int64_t(1) << 20)),
                             kThreads, 0, stream>>>(d, out.data_ptr<float>(), ho, wo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor make_targets_from_points_cuda(const at::Tensor& points_in, int64_t height,
                                         int64_t width, int64_t patch_size, int64_t stride) {
  const auto shape = check_points(points_in, height, width, patch_size, stride);
  c10::cuda::CUDAGuard guard(points_in.device());
  const auto points = points_in.contiguous();
  if (points.size(0) > 0) {
    // Out-of-range points are an error, as on the CPU: one reduction and a sync.
    const auto rows = points.select(1, 0), cols = points.select(1, 1);
    const auto bad = rows.lt(0).logical_or_(rows.ge(height)).logical_or_(cols.lt(0)).logical_or_(
        cols.ge(width));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
      const auto p = points[i].cpu();
      raise_bad_point(i, p[0].item<int64_t>(), p[1].item<int64_t>(), height, width);
    }
  }
  auto out = at::empty(shape, points.options().dtype(at::kFloat));
  if (points.size(0) < std::numeric_limits<int32_t>::max()) {
    launch_points<int32_t>(points, out, patch_size, stride);
  } else {
    launch_points<int64_t>(points, out, patch_size, stride);
  }
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CUDA, m) {
  m.impl("make_targets", &fastcount::make_targets_cuda);
  m.impl("make_targets_from_points", &fastcount::make_targets_from_points_cuda);
}
