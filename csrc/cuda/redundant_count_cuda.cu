// CUDA kernel: redundancy-normalised counts, per image or per cell x cell block.
//
// Two-level, deterministic reduction (no float atomics, so results do not
// depend on scheduling): (1) one warp per row segment, lane k summing elements
// k, k+32, ... then an xor-butterfly; (2) one thread per cell adding its rows'
// segment sums top to bottom. This is the canonical order of fastcount_ops.h,
// which the CPU kernel follows too: both devices agree bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../fastcount_ops.h"

namespace fastcount {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ map, double* __restrict__ seg,
                                   int64_t rows, int64_t w, int64_t cw, int64_t nseg) {
  const int lane = threadIdx.x & (kLanes - 1);
  const int64_t warps = blockDim.x / kLanes;
  const int64_t total = rows * nseg;
  // the loop bound is uniform across a warp, so every lane reaches the shuffles
  for (int64_t wid = blockIdx.x * warps + threadIdx.x / kLanes; wid < total;
       wid += int64_t(gridDim.x) * warps) {
    const int64_t row = wid / nseg, x0 = (wid % nseg) * cw, len = imin(cw, w - x0);
    const T* p = map + row * w + x0;
    double acc = 0.0;
    for (int64_t x = lane; x < len; x += kLanes) acc += to_double(p[x]);
    for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) seg[wid] = acc;
  }
}

__global__ void cell_sum_kernel(const double* __restrict__ seg, double* __restrict__ out,
                                int64_t n_maps, int64_t h, int64_t chh, int64_t ncell_rows,
                                int64_t nseg, double redundancy) {
  const int64_t total = n_maps * ncell_rows * nseg;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = t % nseg, c = t / nseg, n = c / ncell_rows, i = c % ncell_rows;
    const int64_t y1 = imin((i + 1) * chh, h);
    double acc = 0.0;
    for (int64_t y = i * chh; y < y1; ++y) acc += seg[(n * h + y) * nseg + j];
    out[t] = acc / redundancy;
  }
}

at::Tensor redundant_count_cuda(const at::Tensor& count_map, int64_t patch_size, int64_t stride,
                                int64_t cell) {
  int64_t n_maps, h, w;
  const auto shape = check_count_map(count_map, patch_size, stride, cell, n_maps, h, w);
  c10::cuda::CUDAGuard guard(count_map.device());
  auto out = at::empty(shape, count_map.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  if (h == 0 || w == 0) return out.fill_(0.0);
  const double redundancy = static_cast<double>((patch_size / stride) * (patch_size / stride));
  auto map = count_map.contiguous();
  const int64_t cw = cell > 0 ? cell : w, chh = cell > 0 ? cell : h;
  const int64_t nseg = (w + cw - 1) / cw, ncell_rows = (h + chh - 1) / chh;
  auto seg = at::empty({n_maps * h * nseg}, map.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t warps = kThreads / kLanes;
  const int64_t blocks1 = imin((n_maps * h * nseg + warps - 1) / warps, int64_t(1) << 20);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, map.scalar_type(), "redundant_count_cuda", [&] {
    segment_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks1), kThreads, 0, stream>>>(
        map.const_data_ptr<scalar_t>(), seg.data_ptr<double>(), n_maps * h, w, cw, nseg);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t cells = n_maps * ncell_rows * nseg;
  const int64_t blocks2 = imin((cells + kThreads - 1) / kThreads, int64_t(1) << 20);
  cell_sum_kernel<<<static_cast<unsigned>(blocks2), kThreads, 0, stream>>>(
      seg.data_ptr<double>(), out.data_ptr<double>(), n_maps, h, chh, ncell_rows, nseg, redundancy);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CUDA, m) { m.impl("redundant_count", &fastcount::redundant_count_cuda); }
