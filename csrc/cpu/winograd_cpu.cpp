// CPU kernel: a 3x3 conv (stride 1, zero padding 1) + bias + LeakyReLU by Winograd
// F(4x4, 3x3), on NHWC float32:
//
//     out[n, y, x, o] = leaky(b[o] + sum_{c, i, j} x[n, y + i - 1, x + j - 1, c] * w[o, c, i, j])
//
// Each 4x4 output tile is A^T [ U (.) (B^T d B) ] A from its 6x6 input patch d: per tile
// and channel pair, 36 multiply-adds instead of 144, at the price of two small
// transforms per tile and channel. u is the weight transform G w G^T, made once per
// conv in Python (fastcount.inference.winograd.transform_weights) as float32
// (36, C, Opad), out channels zero-padded to a multiple of 16.
//
// One work item is TB tiles of one tile row: their patches are transformed into V
// (36, TB, C), then for each of the 36 positions a small GEMM (TB x C) @ (C x Opad)
// runs as register tiles (broadcast V, FMA a row of U: U's (C, Opad) slice stays in
// L1/L2 while the TB tiles reuse it), then the inverse transform adds the bias, applies
// the LeakyReLU and writes the tile's (up to) 4x4 pixels. Every buffer is the thread's
// own and sized for L2.
//
// The loops are compiled for AVX-512, AVX2+FMA and the baseline and picked at run time
// (simd.h; FASTCOUNT_WINOGRAD_ISA names one, for tests). Sums run in a fixed order whatever the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../fastcount_ops.h"
#include "simd.h"

namespace fastcount {
namespace {

using namespace simd;

constexpr int64_t kPad = 16;  // out channels padded to a multiple of this in u
constexpr int kPix = 6;       // tiles per register tile of the widest out-channel tile
constexpr int64_t kAhead = 2;  // tiles ahead whose new input pixels are prefetched
constexpr int64_t kTB = 24;   // tiles per work item (a multiple of kPix, 2 * kPix and 4 * kPix)

// B^T d for one column (or row) of a 6x6 patch; T is a vector type or float.
template <typename T>
FC_INLINE void bt6(const T d[6], T r[6]) {
  r[0] = d[0] * 4.f - d[2] * 5.f + d[4];
  r[1] = d[3] + d[4] - (d[1] + d[2]) * 4.f;
  r[2] = (d[1] - d[2]) * 4.f + d[4] - d[3];
  r[3] = (d[3] - d[1]) * 2.f + d[4] - d[2];
  r[4] = (d[1] - d[3]) * 2.f + d[4] - d[2];
  r[5] = d[1] * 4.f - d[3] * 5.f + d[5];
}

// A^T m for one column (or row) of 6 products.
template <typename T>
FC_INLINE void at6(const T m[6], T y[4]) {
  const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  y[0] = m[0] + s12 + s34;
  y[1] = d12 + d34 * 2.f;
  y[2] = s12 + s34 * 4.f;
  y[3] = d12 + d34 * 8.f + m[5];
}

struct Args {
  const float* x;   // (N, H, W, C)
  const float* u;   // (36, C, Opad)
  const float* b;   // (Opad,)
  float* out;       // (N, H, W, O)
  int64_t N, H, W, C, O, Opad;
  int64_t ty, tx, chunks;  // tile rows, tiles per row, items per tile row
  float slope;
};

// Channels [c, c + lanes) of tile t0 + t's patch (tile row `row`) -> V (36, kTB, C);
// a tile past nt is zero.
template <typename T>
FC_INLINE void transform_tile(const Args& a, int64_t n, int64_t row, int64_t t0, int64_t t, int64_t nt,
                              int64_t c, float* V) {
  const int64_t y0 = row * 4 - 1;
  {
    T d[6][6];
    const int64_t x0 = (t0 + t) * 4 - 1;
    const bool inside = t < nt && y0 >= 0 && y0 + 6 <= a.H && x0 >= 0 && x0 + 6 <= a.W;
    for (int i = 0; i < 6; ++i) {
      const int64_t yy = y0 + i;
      const float* src = a.x + ((n * a.H + yy) * a.W + x0) * a.C + c;
      for (int j = 0; j < 6; ++j) {
        const int64_t xx = x0 + j;
        if (inside || (t < nt && yy >= 0 && yy < a.H && xx >= 0 && xx < a.W))
          d[i][j] = load<T>(src + j * a.C);
        else
          d[i][j] = T{};
      }
    }
    T r[6][6], col[6], tmp[6];
    for (int j = 0; j < 6; ++j) {  // B^T d: down each column
      for (int i = 0; i < 6; ++i) col[i] = d[i][j];
      bt6(col, tmp);
      for (int i = 0; i < 6; ++i) r[i][j] = tmp[i];
    }
    for (int i = 0; i < 6; ++i) {  // (B^T d) B: along each row
      bt6(r[i], tmp);
      for (int j = 0; j < 6; ++j) store<T>(V + ((i * 6 + j) * kTB + t) * a.C + c, tmp[j]);
    }
  }
}

template <typename V>
FC_INLINE void input_transform(const Args& a, int64_t n, int64_t row, int64_t t0, int64_t nt, float* Vb) {
  constexpr int W = lanes<V>();
  // Tile by tile, all channels of a tile in a row: the patch's pixels are read whole
  // (contiguous NHWC rows) rather than one vector per pass (measured: the strided
  // passes stalled on their loads).
  const int64_t y0 = row * 4 - 1;
  for (int64_t t = 0; t < kTB; ++t) {
    // Prefetch the pixels tile t + kAhead adds to its patch (its 4 new columns, 6 rows): the
    // loads of a tile's new pixels otherwise stall (measured: ~40% of a thin block's time).
    const int64_t xn = (t0 + t + kAhead) * 4 + 1;
    if (t + kAhead < nt && xn + 4 <= a.W) {
      for (int i = 0; i < 6; ++i) {
        if (y0 + i < 0 || y0 + i >= a.H) continue;
        const char* p = reinterpret_cast<const char*>(a.x + ((n * a.H + y0 + i) * a.W + xn) * a.C);
        for (int64_t off = 0; off < 4 * a.C * 4; off += 64) __builtin_prefetch(p + off);
      }
    }
    int64_t c = 0;
    for (; c + W <= a.C; c += W) transform_tile<V>(a, n, row, t0, t, nt, c, Vb);
    // the remaining channels in narrower vectors (40 = 16 + 16 + 8), then one by one
    if constexpr (W > 8)
      for (; c + 8 <= a.C; c += 8) transform_tile<v8>(a, n, row, t0, t, nt, c, Vb);
    if constexpr (W > 4)
      for (; c + 4 <= a.C; c += 4) transform_tile<v4>(a, n, row, t0, t, nt, c, Vb);
    for (; c < a.C; ++c) transform_tile<float>(a, n, row, t0, t, nt, c, Vb);
  }
}

// M[k] (kTB, Opad) = V[k] (kTB, C) @ U[k] (C, Opad), out channels [o0, o0 + OBV * W), PIX tiles at a time.
template <typename V, int OBV, int PIX>
FC_INLINE void gemm_tile(const Args& a, const float* Vk, const float* Uk, float* Mk, int64_t o0) {
  constexpr int W = lanes<V>();
  static_assert(kTB % PIX == 0, "register tiles must divide a work item");
  for (int64_t t = 0; t < kTB; t += PIX) {
    V acc[PIX][OBV];
    #pragma GCC unroll 32
    for (int i = 0; i < PIX; ++i)
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) acc[i][j] = V{};
    const float* vrow = Vk + t * a.C;
    for (int64_t c = 0; c < a.C; ++c) {
      V w[OBV];
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) w[j] = load<V>(Uk + c * a.Opad + o0 + j * W);
      #pragma GCC unroll 32
      for (int i = 0; i < PIX; ++i) {
        const V xi = splat_load<V>(vrow + i * a.C + c);
        #pragma GCC unroll 32
        for (int j = 0; j < OBV; ++j) acc[i][j] += xi * w[j];
      }
    }
    #pragma GCC unroll 32
    for (int i = 0; i < PIX; ++i)
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) store(Mk + (t + i) * a.Opad + o0 + j * W, acc[i][j]);
  }
}

template <typename V, int OBV>
FC_INLINE void gemms(const Args& a, const float* Vb, float* Mb) {
  constexpr int W = lanes<V>();
  for (int k = 0; k < 36; ++k) {
    const float* Vk = Vb + k * kTB * a.C;
    const float* Uk = a.u + k * a.C * a.Opad;
    float* Mk = Mb + k * kTB * a.Opad;
    int64_t o0 = 0;
    for (; o0 + OBV * W <= a.Opad; o0 += OBV * W) gemm_tile<V, OBV, kPix>(a, Vk, Uk, Mk, o0);
    if constexpr (OBV >= 4)
      for (; o0 + 2 * W <= a.Opad; o0 += 2 * W) gemm_tile<V, 2, kPix * OBV / 2>(a, Vk, Uk, Mk, o0);
    for (; o0 < a.Opad; o0 += W) gemm_tile<V, 1, kPix * OBV>(a, Vk, Uk, Mk, o0);
  }
}

// M (36, kTB, Opad) -> the tiles' pixels: A^T M A + bias, LeakyReLU, real channels only.
template <typename V>
FC_INLINE void output_transform(const Args& a, int64_t n, int64_t row, int64_t t0, int64_t nt, const float* Mb) {
  constexpr int W = lanes<V>();
  alignas(64) float part[W];
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t y0 = row * 4, x0 = (t0 + t) * 4;
    const int64_t ny = std::min<int64_t>(4, a.H - y0), nx = std::min<int64_t>(4, a.W - x0);
    for (int64_t o = 0; o < a.Opad && o < a.O; o += W) {
      V m[6][6], r[4][6], col[6], tmp[4];
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 6; ++j) m[i][j] = load<V>(Mb + ((i * 6 + j) * kTB + t) * a.Opad + o);
      for (int j = 0; j < 6; ++j) {
        for (int i = 0; i < 6; ++i) col[i] = m[i][j];
        at6(col, tmp);
        for (int i = 0; i < 4; ++i) r[i][j] = tmp[i];
      }
      const V bias = load<V>(a.b + o);
      const int64_t no = std::min<int64_t>(W, a.O - o);
      for (int i = 0; i < ny; ++i) {
        at6(r[i], tmp);
        for (int j = 0; j < nx; ++j) {
          float* dst = a.out + ((n * a.H + y0 + i) * a.W + x0 + j) * a.O + o;
          const V y = leaky(tmp[j] + bias, a.slope);
          if (no == W) {
            store(dst, y);
          } else {
            store(part, y);
            std::memcpy(dst, part, sizeof(float) * no);
          }
        }
      }
    }
  }
}

template <typename V, int OBV>
FC_INLINE void run_items(const Args& a, int64_t i0, int64_t i1, float* Vb, float* Mb) {
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t chunk = it % a.chunks, row = (it / a.chunks) % a.ty, n = it / (a.chunks * a.ty);
    const int64_t t0 = chunk * kTB, nt = std::min(kTB, a.tx - t0);
    input_transform<V>(a, n, row, t0, nt, Vb);
    gemms<V, OBV>(a, Vb, Mb);
    output_transform<V>(a, n, row, t0, nt, Mb);
  }
}

#ifdef FC_HAVE_X86_VARIANTS
__attribute__((target("avx512f"))) void run_avx512(const Args& a, int64_t i0, int64_t i1, float* Vb, float* Mb) {
  run_items<v16, 4>(a, i0, i1, Vb, Mb);
}
__attribute__((target("avx2,fma"))) void run_avx2(const Args& a, int64_t i0, int64_t i1, float* Vb, float* Mb) {
  run_items<v8, 2>(a, i0, i1, Vb, Mb);
}
#endif
void run_base(const Args& a, int64_t i0, int64_t i1, float* Vb, float* Mb) { run_items<v4, 2>(a, i0, i1, Vb, Mb); }

using RunFn = void (*)(const Args&, int64_t, int64_t, float*, float*);

RunFn pick_variant() {
#ifdef FC_HAVE_X86_VARIANTS
  return by_isa<RunFn>("FASTCOUNT_WINOGRAD_ISA", run_base, run_avx2, run_avx512);
#else
  return by_isa<RunFn>("FASTCOUNT_WINOGRAD_ISA", run_base, run_base, run_base);
#endif
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                                int64_t out_channels, double slope) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat &&
                       bias.scalar_type() == at::kFloat,
                   "x, u and bias must be float32, got ", x.scalar_type(), ", ", u.scalar_type(), " and ",
                   bias.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be NHWC (N, H, W, C), got shape ", x.sizes());
  const int64_t C = x.size(3), O = out_channels;
  TORCH_CHECK_VALUE(O >= 1, "out_channels must be >= 1, got ", O);
  const int64_t Opad = (O + kPad - 1) / kPad * kPad;
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == 36 && u.size(1) == C && u.size(2) == Opad,
                    "u must be the transformed weights (36, ", C, ", ", Opad, ") for ", C,
                    " input and ", O, " output channels, got shape ", u.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == Opad, "bias must be (", Opad,
                    ",) (zero-padded like u), got shape ", bias.sizes());
  auto out = at::empty({x.size(0), x.size(1), x.size(2), O}, x.options());
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous(), uc = u.contiguous(), bc = bias.contiguous();
  Args a;
  a.x = xc.const_data_ptr<float>();
  a.u = uc.const_data_ptr<float>();
  a.b = bc.const_data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.N = x.size(0);
  a.H = x.size(1);
  a.W = x.size(2);
  a.C = C;
  a.O = O;
  a.Opad = Opad;
  a.ty = (a.H + 3) / 4;
  a.tx = (a.W + 3) / 4;
  a.chunks = (a.tx + kTB - 1) / kTB;
  a.slope = static_cast<float>(slope);
  const RunFn fn = pick_variant();
  const int64_t items = a.N * a.ty * a.chunks;
  at::parallel_for(0, items, grain_for(36 * kTB * std::max<int64_t>(C, 1) * Opad), [&](int64_t i0, int64_t i1) {
    std::vector<float> Vb(static_cast<size_t>(36 * kTB * std::max<int64_t>(C, 1)));
    std::vector<float> Mb(static_cast<size_t>(36 * kTB * Opad));
    fn(a, i0, i1, Vb.data(), Mb.data());
  });
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("winograd_conv3x3", &fastcount::winograd_conv3x3_cpu); }
