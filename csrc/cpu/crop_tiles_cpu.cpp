// CPU kernel: the output pass of the FFT overlap-save convolutions
// (fastcount/inference/fft.py, SpectralConv), the inverse of gather_tiles:
//
//     out[n, y, x, o] = leaky_relu(tiles[p, o, y % b, x % b], slope)
//     with p = (n*ny + y / b)*nx + x / b, for y < height, x < width
//
// tiles is irfft2's output (P, O, t, t); only each tile's valid b x b corner is
// read. out is NHWC, the layout every following layer (oneDNN convs, the 1x1
// head) reads, so the crop, the LeakyReLU and the NCHW -> NHWC transpose are
// one pass. One work item is one output row; columns go through a small
// (O x 16) buffer so reads (rows of one channel) and writes (pixels of all
// channels) are both contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fastcount {

at::Tensor crop_tiles_cpu(const at::Tensor& tiles, int64_t n, int64_t ny, int64_t nx, int64_t b, int64_t height,
                          int64_t width, double slope) {
  TORCH_CHECK(tiles.dim() == 4 && tiles.scalar_type() == at::kFloat && tiles.size(2) == tiles.size(3),
              "crop_tiles: tiles must be a float32 (P, O, t, t) tensor, got ", tiles.scalar_type(), " of shape ",
              tiles.sizes());
  TORCH_CHECK(n >= 1 && ny >= 1 && nx >= 1 && b >= 1 && height >= 0 && width >= 0,
              "crop_tiles: n, ny, nx, b must be positive and height, width non-negative, got ", n, ", ", ny, ", ",
              nx, ", ", b, ", ", height, ", ", width);
  TORCH_CHECK(tiles.size(0) == n * ny * nx, "crop_tiles: tiles has ", tiles.size(0), " tiles, expected n*ny*nx = ",
              n * ny * nx);
  const int64_t o = tiles.size(1), t = tiles.size(2);
  TORCH_CHECK(b <= t && height <= ny * b && width <= nx * b, "crop_tiles: a ", height, "x", width,
              " output needs b <= t and ny*b, nx*b covering it; got b=", b, ", t=", t, ", ny=", ny, ", nx=", nx);
  const at::Tensor tc = tiles.contiguous();
  at::Tensor out = at::empty({n, height, width, o}, tc.options());
  if (out.numel() == 0) return out;
  const float* src = tc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(slope);
  constexpr int64_t kCols = 16;
  at::parallel_for(0, n * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(o * kCols));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ni = row / height, y = row % height, iy = y / b, ty = y % b;
      float* drow = dst + row * width * o;
      for (int64_t x0 = 0; x0 < width; x0 += kCols) {
        const int64_t cols = std::min(kCols, width - x0);
        // Columns x0..x0+cols may straddle two tiles: gather per column run within a tile.
        for (int64_t j0 = 0; j0 < cols;) {
          const int64_t x = x0 + j0, ix = x / b, tx = x % b;
          const int64_t run = std::min(cols - j0, b - tx);
          const float* tile = src + ((ni * ny + iy) * nx + ix) * o * t * t + ty * t + tx;
          for (int64_t k = 0; k < o; ++k) {
            const float* v = tile + k * t * t;
            float* bk = buf.data() + k * kCols + j0;
            for (int64_t j = 0; j < run; ++j) bk[j] = v[j];
          }
          j0 += run;
        }
        for (int64_t j = 0; j < cols; ++j) {
          float* d = drow + (x0 + j) * o;
          for (int64_t k = 0; k < o; ++k) {
            const float v = buf[k * kCols + j];
            d[k] = v > 0.f ? v : v * s;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("crop_tiles", &fastcount::crop_tiles_cpu); }
