// CPU kernel: a stack of 1x1 convs (bias + LeakyReLU each) applied per pixel, fused:
//
//     z0 = x;  z[k+1][p, o] = leaky(b_k[o] + sum_c z[k][p, c] * w_k[o, c], slope_k)
//
// x is (P, C) float32, the NHWC feature map's pixels as rows; the result is (P, O_last).
// This is the count head of CountCeption (fastcount/inference/cpu.py, _Head): three
// 1x1 convs (32 -> 64 -> 64 -> 1 at width 1) that oneDNN runs as three memory passes
// with 64-channel intermediates. Here a thread takes blocks of kRows pixels and runs
// every layer on the block while it sits in L1/L2, so only x is read from memory and
// only the last layer's map is written.
//
// A layer is computed as register tiles of pixels x (vectors of out channels):
// broadcast one input, FMA a row of the transposed weights (packed per call, out
// channels zero-padded to a multiple of 16 so every vector width divides them; the
// padded channels stay exactly 0 and meet zero weights in the next layer). The final
// 64 -> 1 layer thus does 16x its multiply-adds, still cheaper than a dot product per
// pixel with its horizontal sum (measured), and the sums run in the order oneDNN's 1x1
// convs use (bit-identical results on this machine).
//
// The layer loops are compiled for AVX-512, AVX2+FMA and the baseline and picked at
// run time (simd.h; FASTCOUNT_POINTWISE_MLP_ISA names one, for tests). Sums run in
// input-channel order, float32, whatever the thread count.
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

constexpr int64_t kPad = 16;   // every layer's out channels are padded to a multiple of this
constexpr int kPix = 6;        // pixels per register tile of the widest out-channel tile
constexpr int64_t kRows = 240; // pixels per block (a multiple of kPix)

struct Layer {
  const float* wt;  // (C, Opad): transposed, zero past O
  const float* b;   // (Opad,), zero past O
  int64_t C, O, Opad;
  float slope;
};

// Out channels [o0, o0 + OBV * W) for the block's kRows pixels, PIX at a time.
template <typename V, int OBV, int PIX>
FC_INLINE void layer_tile(const Layer& l, const float* in, int64_t ldin, float* out, int64_t ldout,
                         int64_t o0) {
  constexpr int W = lanes<V>();
  V bias[OBV];
  #pragma GCC unroll 32
  for (int j = 0; j < OBV; ++j) bias[j] = load<V>(l.b + o0 + j * W);
  static_assert(kRows % PIX == 0, "register tiles must divide a block");
  for (int64_t p = 0; p < kRows; p += PIX) {
    V acc[PIX][OBV];
    #pragma GCC unroll 32
    for (int i = 0; i < PIX; ++i)
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) acc[i][j] = bias[j];
    const float* row = in + p * ldin;
    for (int64_t c = 0; c < l.C; ++c) {
      V w[OBV];
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) w[j] = load<V>(l.wt + c * l.Opad + o0 + j * W);
      #pragma GCC unroll 32
      for (int i = 0; i < PIX; ++i) {
        const V xi = splat_load<V>(row + i * ldin + c);
        #pragma GCC unroll 32
        for (int j = 0; j < OBV; ++j) acc[i][j] += xi * w[j];
      }
    }
    #pragma GCC unroll 32
    for (int i = 0; i < PIX; ++i)
      #pragma GCC unroll 32
      for (int j = 0; j < OBV; ++j) store(out + (p + i) * ldout + o0 + j * W, leaky(acc[i][j], l.slope));
  }
}

// Out channels in tiles of OBV vectors, the rest in narrower tiles of more pixels (the
// same number of accumulators: enough independent FMAs to hide their latency).
template <typename V, int OBV>
FC_INLINE void layer(const Layer& l, const float* in, int64_t ldin, float* out, int64_t ldout) {
  constexpr int W = lanes<V>();
  int64_t o0 = 0;
  for (; o0 + OBV * W <= l.Opad; o0 += OBV * W) layer_tile<V, OBV, kPix>(l, in, ldin, out, ldout, o0);
  if constexpr (OBV >= 4)
    for (; o0 + 2 * W <= l.Opad; o0 += 2 * W) layer_tile<V, 2, kPix * OBV / 2>(l, in, ldin, out, ldout, o0);
  for (; o0 < l.Opad; o0 += W) layer_tile<V, 1, kPix * OBV>(l, in, ldin, out, ldout, o0);
}

struct Args {
  const float* x;
  float* out;
  int64_t P, C;
  std::vector<Layer> layers;
  int64_t width;  // widest row of any layer's output (floats), the block buffers' stride
};

// Blocks [i0, i1) of kRows pixels. buf holds two ping-pong (kRows, width) buffers plus
// a (kRows, C) copy of the input for the last, partial block (zero-filled past P).
template <typename V, int OBV>
FC_INLINE void run_blocks(const Args& a, int64_t i0, int64_t i1, float* buf) {
  float* ping = buf;
  float* pong = buf + kRows * a.width;
  float* tail = pong + kRows * a.width;
  for (int64_t blk = i0; blk < i1; ++blk) {
    const int64_t p0 = blk * kRows, n = std::min(kRows, a.P - p0);
    const float* in = a.x + p0 * a.C;
    if (n < kRows) {
      std::memcpy(tail, in, sizeof(float) * n * a.C);
      std::memset(tail + n * a.C, 0, sizeof(float) * (kRows - n) * a.C);
      in = tail;
    }
    int64_t ldin = a.C;
    float* dst = ping;
    for (const Layer& l : a.layers) {
      layer<V, OBV>(l, in, ldin, dst, l.Opad);
      in = dst;
      ldin = l.Opad;
      dst = dst == ping ? pong : ping;
    }
    const int64_t o = a.layers.back().O;
    for (int64_t p = 0; p < n; ++p) std::memcpy(a.out + (p0 + p) * o, in + p * ldin, sizeof(float) * o);
  }
}

// Register tiles: kPix x OBV accumulators + OBV weights + a broadcast fit the register
// file (32 zmm: 6 x 4 + 4 + 1; 16 ymm/xmm: 6 x 2 + 2 + 1).
#ifdef FC_HAVE_X86_VARIANTS
__attribute__((target("avx512f"))) void run_avx512(const Args& a, int64_t i0, int64_t i1, float* buf) {
  run_blocks<v16, 4>(a, i0, i1, buf);
}
__attribute__((target("avx2,fma"))) void run_avx2(const Args& a, int64_t i0, int64_t i1, float* buf) {
  run_blocks<v8, 2>(a, i0, i1, buf);
}
#endif
void run_base(const Args& a, int64_t i0, int64_t i1, float* buf) { run_blocks<v4, 2>(a, i0, i1, buf); }

using RunFn = void (*)(const Args&, int64_t, int64_t, float*);

RunFn pick_variant() {
#ifdef FC_HAVE_X86_VARIANTS
  return by_isa<RunFn>("FASTCOUNT_POINTWISE_MLP_ISA", run_base, run_avx2, run_avx512);
#else
  return by_isa<RunFn>("FASTCOUNT_POINTWISE_MLP_ISA", run_base, run_base, run_base);
#endif
}

at::Tensor pointwise_mlp_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             at::ArrayRef<double> slopes) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be (pixels, channels), got shape ", x.sizes());
  const int64_t nl = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(nl >= 1, "weights must hold at least one layer");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == nl && static_cast<int64_t>(slopes.size()) == nl,
                    "weights, biases and slopes must have one entry per layer, got ", nl, ", ",
                    biases.size(), " and ", slopes.size());
  Args a;
  a.P = x.size(0);
  a.C = x.size(1);
  a.width = 0;
  // Packed weights live here for the call (tiny: a few 64 x 64 matrices).
  std::vector<at::Tensor> keep;
  int64_t cin = a.C;      // the layer's input width as the kernel sees it (padded)
  int64_t creal = a.C;    // ... and its real channels
  for (int64_t k = 0; k < nl; ++k) {
    const at::Tensor& w = weights[k];
    const at::Tensor& b = biases[k];
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
                     "weights and biases must be float32, layer ", k, " has ", w.scalar_type(), " and ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == creal, "weights[", k, "] must be (out, ", creal,
                      "), got shape ", w.sizes());
    const int64_t O = w.size(0);
    TORCH_CHECK_VALUE(O >= 1, "weights[", k, "] has no out channels");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == O, "biases[", k, "] must be (", O, ",), got shape ", b.sizes());
    Layer l;
    l.O = O;
    l.slope = static_cast<float>(slopes[k]);
    l.C = cin;
    l.Opad = (O + kPad - 1) / kPad * kPad;
    at::Tensor wt = at::zeros({cin, l.Opad}, w.options());
    wt.narrow(0, 0, creal).narrow(1, 0, O).copy_(w.t());
    at::Tensor bp = at::zeros({l.Opad}, b.options());
    bp.narrow(0, 0, O).copy_(b);
    keep.push_back(wt);
    keep.push_back(bp);
    l.wt = wt.const_data_ptr<float>();
    l.b = bp.const_data_ptr<float>();
    a.layers.push_back(l);
    a.width = std::max(a.width, l.Opad);
    cin = l.Opad;
    creal = O;
  }
  const int64_t O = a.layers.back().O;
  auto out = at::empty({a.P, O}, x.options());
  if (a.P == 0) return out;
  const auto xc = x.contiguous();
  a.x = xc.const_data_ptr<float>();
  a.out = out.data_ptr<float>();
  const RunFn fn = pick_variant();
  const int64_t blocks = (a.P + kRows - 1) / kRows;
  int64_t macs = 0;
  for (const Layer& l : a.layers) macs += l.C * l.Opad;
  at::parallel_for(0, blocks, grain_for(macs * kRows / 16), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(static_cast<size_t>(2 * kRows * a.width + kRows * a.C));
    fn(a, i0, i1, buf.data());
  });
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("pointwise_mlp", &fastcount::pointwise_mlp_cpu); }
