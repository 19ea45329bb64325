// CPU kernel: the tile gather of the FFT overlap-save convolutions
// (fastcount/inference/fft.py, SpectralConv):
//
//     out[c, p, ty, tx] = x[n, iy*step + ty, ix*step + tx, c]   (0 outside the image)
//     with p = (n*ny + iy)*nx + ix
//
// x is the network's NHWC activation (float32, or bfloat16 widened in the same pass); out is exactly the contiguous input rfft2
// transforms, so the NHWC -> CHW transpose, the zero padding to whole tiles and
// rfft2's own copy of a strided tile view become one pass. One work item is one
// row of one tile: it reads t*C contiguous floats (L1/L2-resident) and writes C
// rows of t floats, in 16 x 16 (channel x pixel) blocks so reads and writes are both
// contiguous runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../fastcount_ops.h"

namespace fastcount {

namespace {

// One work item is one row of one tile (see the file comment). T is the input's
// element type (float or bfloat16); the tiles are always float32.
template <typename T>
void gather_rows(const T* src, float* dst, int64_t n, int64_t h, int64_t w, int64_t c, int64_t t,
                 int64_t step, int64_t ny, int64_t nx) {
  const int64_t p = n * ny * nx;
  const int64_t plane = p * t * t;  // distance between channels in out
  constexpr int64_t kCB = 16;
  at::parallel_for(0, p * t, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pi = item / t, ty = item % t;
      const int64_t ni = pi / (ny * nx), iy = (pi / nx) % ny, ix = pi % nx;
      const int64_t y = iy * step + ty, x0 = ix * step;
      const int64_t valid = y < h ? std::max<int64_t>(0, std::min(t, w - x0)) : 0;
      float* row = dst + (pi * t + ty) * t;  // channel 0's row; channel k's at row + k * plane
      if (valid == 0) {
        for (int64_t k = 0; k < c; ++k) std::fill(row + k * plane, row + k * plane + t, 0.f);
        continue;
      }
      const T* s = src + ((ni * h + y) * w + x0) * c;
      // kCB x kCB blocks (channels x pixels) are transposed through a buffer in L1, so every
      // channel row is written kCB floats at a time instead of one scattered float per
      // channel and pixel (measured: the scattered stores made this pass ~2x slower).
      float blk[kCB][kCB];
      for (int64_t k0 = 0; k0 < c; k0 += kCB) {
        const int64_t kn = std::min(kCB, c - k0);
        for (int64_t x1 = 0; x1 < valid; x1 += kCB) {
          const int64_t xn = std::min(kCB, valid - x1);
          for (int64_t xx = 0; xx < xn; ++xx) {
            const T* v = s + (x1 + xx) * c + k0;
            for (int64_t k = 0; k < kn; ++k) blk[k][xx] = static_cast<float>(v[k]);
          }
          for (int64_t k = 0; k < kn; ++k) std::memcpy(row + (k0 + k) * plane + x1, blk[k], sizeof(float) * xn);
        }
        for (int64_t k = 0; k < kn; ++k) std::fill(row + (k0 + k) * plane + valid, row + (k0 + k) * plane + t, 0.f);
      }
    }
  });
}

}  // namespace

at::Tensor gather_tiles_cpu(const at::Tensor& x, int64_t t, int64_t step, int64_t ny, int64_t nx) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gather_tiles: x must be a float32 or bfloat16 (N, H, W, C) tensor, got ", x.scalar_type(),
              " of shape ", x.sizes());
  TORCH_CHECK(t >= 1 && step >= 1 && ny >= 1 && nx >= 1,
              "gather_tiles: t, step, ny, nx must be positive, got ", t, ", ", step, ", ", ny, ", ", nx);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0), h = xc.size(1), w = xc.size(2), c = xc.size(3);
  const int64_t p = n * ny * nx;
  // bfloat16 input (the bf16 pipeline) is widened here, in the same pass.
  at::Tensor out = at::empty({c, p, t, t}, xc.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (xc.scalar_type() == at::kFloat) {
    gather_rows(xc.data_ptr<float>(), out.data_ptr<float>(), n, h, w, c, t, step, ny, nx);
  } else {
    gather_rows(xc.data_ptr<at::BFloat16>(), out.data_ptr<float>(), n, h, w, c, t, step, ny, nx);
  }
  return out;
}

}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("gather_tiles", &fastcount::gather_tiles_cpu); }
