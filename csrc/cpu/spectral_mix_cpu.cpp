// CPU kernel: the per-frequency complex channel mixing of the FFT overlap-save
// convolutions (fastcount/inference/fft.py, SpectralConv):
//
//     out[p, o, f] = sum_c x[c, p, f] * k[f, c, o]          (complex64)
//
// x is rfft2's output as it comes out (channels, tiles, frequencies) and out is
// the layout irfft2 reads (tiles, out channels, frequencies), so neither needs a
// transpose. k is the weight spectrum repacked once per FFT size (Python:
// fastcount.inference.fft.pack_spectrum) as float32 (NB, G, C, kOGroup, 2, kBlock):
// frequencies in blocks of kBlock, out channels in groups of kOGroup, real and
// imaginary parts planar, zero past F and past O.
//
// One work item is one frequency block and a few tiles (PB): their input is
// deinterleaved into a small planar buffer, then PB x OB (tile, out channel)
// pairs accumulate in registers over all input channels, one kBlock-wide
// vector of frequencies per real/imaginary part (the weights of a register
// tile are read sequentially). Items are ordered block-major, so consecutive
// items of a thread reuse the block's weights from L2; the next item's input
// rows (strided, the DRAM-latency-bound reads) are prefetched during the
// current item's first register tile.
//
// The hot loop is compiled three times (AVX-512, AVX2+FMA, baseline) and picked at
// run time (simd.h; other compilers/architectures: the baseline only).
// Accumulation is float32, in input-channel order for every output, whatever
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../fastcount_ops.h"
#include "simd.h"

namespace fastcount {
namespace {

constexpr int64_t kBlock = 16;  // frequencies per block: one AVX-512 float32 vector
constexpr int64_t kOGroup = 4;  // out channels interleaved per group in the packed k

using namespace simd;

// A frequency block is processed as kBlock / lanes vectors of the variant's native width.

struct MixArgs {
  const float* x;   // (C, P, F) complex, interleaved
  const float* k;   // (NB, G, C, kOGroup, 2, kBlock) planar
  float* out;       // (P, O, F) complex, interleaved
  int64_t C, P, O, F, NB, G;  // G = ceil(O / kOGroup)
  int64_t items;              // work items in all: NB * ceil(P / tiles per item)
};

// The next work item's input rows (prefetched while this one computes).
struct Next {
  const float* x;  // its row (c = 0, first tile), nullptr when none or already prefetched
  int64_t rows;    // its tiles
};

// Tiles [p0, p0 + PB) x out channels [o0, o0 + OB) of frequency block `b`, storing
// the first `no` out channels; xb holds the block's input for the item's tiles:
// (C, pstride, 2, kBlock). The first o-tile of an item (pf.x set) also prefetches
// the next item's input rows, channel by channel, so their strided DRAM reads
// overlap this item's arithmetic (measured: ~10-15% off the 18x18 layer's mix).
template <typename V, int PB, int OB>
FC_INLINE void mix_tile(const MixArgs& a, const float* xb, int64_t pstride, int64_t b, int64_t p0,
                        int64_t o0, int64_t no, int64_t nf, Next pf) {
  static_assert(kOGroup % OB == 0, "a register tile must not straddle a group of out channels");
  constexpr int W = lanes<V>();
  static_assert(kBlock % W == 0, "the vector width must divide the frequency block");
  // k is (NB, G, C, kOGroup, 2, kBlock): for a fixed tile the c loop reads it sequentially.
  const float* kb = a.k + ((b * a.G + o0 / kOGroup) * a.C * kOGroup + o0 % kOGroup) * 2 * kBlock;
  const int64_t prow = a.P * a.F * 2;  // floats between channels of x
  const int64_t f0 = b * kBlock;
  for (int h = 0; h < kBlock && h < nf; h += W) {  // vectors of the block, one pass each
    V re[PB][OB], im[PB][OB];
    for (int i = 0; i < PB; ++i)
      for (int j = 0; j < OB; ++j) re[i][j] = im[i][j] = V{};
    for (int64_t c = 0; c < a.C; ++c) {
      if (pf.x != nullptr) {
        for (int64_t i = 0; i < pf.rows; ++i) {
          const char* r = reinterpret_cast<const char*>(pf.x + c * prow + i * a.F * 2);
          __builtin_prefetch(r);
          __builtin_prefetch(r + 64);
        }
      }
      const float* xc = xb + c * pstride * 2 * kBlock + h;
      const float* kc = kb + c * kOGroup * 2 * kBlock + h;
      V xr[PB], xi[PB];
      for (int i = 0; i < PB; ++i) {
        xr[i] = load<V>(xc + i * 2 * kBlock);
        xi[i] = load<V>(xc + i * 2 * kBlock + kBlock);
      }
      for (int j = 0; j < OB; ++j) {
        const V kr = load<V>(kc + j * 2 * kBlock), ki = load<V>(kc + j * 2 * kBlock + kBlock);
        for (int i = 0; i < PB; ++i) {
          re[i][j] += xr[i] * kr;
          re[i][j] -= xi[i] * ki;
          im[i][j] += xr[i] * ki;
          im[i][j] += xi[i] * kr;
        }
      }
    }
    pf.x = nullptr;
    const int64_t nl = std::min<int64_t>(W, nf - h);  // valid frequencies of this vector
    for (int i = 0; i < PB; ++i) {
      for (int j = 0; j < OB && j < no; ++j) {
        float* dst = a.out + (((p0 + i) * a.O + o0 + j) * a.F + f0 + h) * 2;
#if !defined(__clang__)
        if constexpr (W == 16) {
          if (nl == W) {  // interleave back to complex with two shuffles
            typedef int vidx __attribute__((vector_size(64)));
            const vidx lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
            const vidx hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
            store(dst, __builtin_shuffle(re[i][j], im[i][j], lo));
            store(dst + W, __builtin_shuffle(re[i][j], im[i][j], hi));
            continue;
          }
        }
#endif
        alignas(64) float r[W], m[W];
        store(r, re[i][j]);
        store(m, im[i][j]);
        for (int64_t l = 0; l < nl; ++l) {
          dst[2 * l] = r[l];
          dst[2 * l + 1] = m[l];
        }
      }
    }
  }
}

// All out channels in tiles of OB (k is zero past O: the last tile computes the
// padding and stores only the real channels).
template <typename V, int PB, int OB>
FC_INLINE void mix_tiles_o(const MixArgs& a, const float* xb, int64_t pstride, int64_t b, int64_t p0,
                           int64_t nf, Next pf) {
  for (int64_t o0 = 0; o0 < a.O; o0 += OB) {
    mix_tile<V, PB, OB>(a, xb, pstride, b, p0, o0, a.O - o0, nf, pf);
    pf.x = nullptr;
  }
}

// The item's np (1..PB) tiles as one register tile of np rows.
template <typename V, int PB, int OB, int N = PB>
FC_INLINE void mix_p(const MixArgs& a, const float* xb, int64_t b, int64_t p0, int64_t np,
                     int64_t nf, Next pf) {
  if constexpr (N >= 1) {
    if (np == N) return mix_tiles_o<V, N, OB>(a, xb, PB, b, p0, nf, pf);
    mix_p<V, PB, OB, N - 1>(a, xb, b, p0, np, nf, pf);
  }
}

// Items [i0, i1): item i is frequency block i / groups, tiles of group i % groups.
template <typename V, int PB, int OB>
FC_INLINE void mix_items(const MixArgs& a, int64_t i0, int64_t i1, float* xb) {
  const int64_t groups = (a.P + PB - 1) / PB;
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t b = it / groups, p0 = (it % groups) * PB;
    const int64_t np = std::min<int64_t>(PB, a.P - p0);
    const int64_t f0 = b * kBlock, nf = std::min(kBlock, a.F - f0);
    // Deinterleave the block's input into xb (C, PB, 2, kBlock), zero past F.
    for (int64_t c = 0; c < a.C; ++c) {
      for (int64_t i = 0; i < np; ++i) {
        const float* src = a.x + ((c * a.P + p0 + i) * a.F + f0) * 2;
        float* dr = xb + (c * PB + i) * 2 * kBlock;
        float* di = dr + kBlock;
        int64_t l = 0;
        for (; l < nf; ++l) {
          dr[l] = src[2 * l];
          di[l] = src[2 * l + 1];
        }
        for (; l < kBlock; ++l) dr[l] = di[l] = 0.f;
      }
    }
    Next pf{nullptr, 0};
    if (it + 1 < a.items) {
      const int64_t bn = (it + 1) / groups, pn = ((it + 1) % groups) * PB;
      pf = {a.x + (pn * a.F + bn * kBlock) * 2, std::min<int64_t>(PB, a.P - pn)};
    }
    mix_p<V, PB, OB>(a, xb, b, p0, np, nf, pf);
  }
}

// Register tiles (tiles x out channels) per instruction set: 2 * PB * OB
// accumulators plus the PB tiles' inputs fit the register file (32 zmm; 16 ymm/xmm).
#ifdef FC_HAVE_X86_VARIANTS
constexpr int kP512 = 3, kO512 = 4, kP256 = 2, kO256 = 2;
__attribute__((target("avx512f"))) void mix_avx512(const MixArgs& a, int64_t i0, int64_t i1,
                                                  float* xb) {
  mix_items<v16, kP512, kO512>(a, i0, i1, xb);
}
__attribute__((target("avx2,fma"))) void mix_avx2(const MixArgs& a, int64_t i0, int64_t i1,
                                                 float* xb) {
  mix_items<v8, kP256, kO256>(a, i0, i1, xb);
}
#endif
constexpr int kPBase = 2, kOBase = 2;
void mix_base(const MixArgs& a, int64_t i0, int64_t i1, float* xb) {
  mix_items<v4, kPBase, kOBase>(a, i0, i1, xb);
}

using MixFn = void (*)(const MixArgs&, int64_t, int64_t, float*);
struct Variant {
  MixFn fn;
  int tiles;  // PB: tiles per work item
};

// The fastest variant this CPU runs, or the one FASTCOUNT_SPECTRAL_MIX_ISA names.
Variant pick_variant() {
  const Variant base{mix_base, kPBase};
#ifdef FC_HAVE_X86_VARIANTS
  return by_isa("FASTCOUNT_SPECTRAL_MIX_ISA", base, Variant{mix_avx2, kP256}, Variant{mix_avx512, kP512});
#else
  return by_isa("FASTCOUNT_SPECTRAL_MIX_ISA", base, base, base);
#endif
}

at::Tensor spectral_mix_cpu(const at::Tensor& x, const at::Tensor& k, int64_t out_channels) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kComplexFloat,
                   "x must be complex64 (the rfft2 spectrum), got dtype ", x.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == at::kFloat,
                   "k must be the float32 packed weight spectrum, got dtype ", k.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be (C, P, F), got shape ", x.sizes());
  TORCH_CHECK_VALUE(out_channels >= 0, "out_channels must be >= 0, got ", out_channels);
  const int64_t C = x.size(0), P = x.size(1), F = x.size(2), O = out_channels;
  const int64_t NB = (F + kBlock - 1) / kBlock, G = (O + kOGroup - 1) / kOGroup;
  TORCH_CHECK_VALUE(k.dim() == 6 && k.size(0) == NB && k.size(1) == G && k.size(2) == C &&
                        k.size(3) == kOGroup && k.size(4) == 2 && k.size(5) == kBlock,
                    "k must be the packed spectrum (ceil(F/", kBlock, "), ceil(O/", kOGroup, "), C, ",
                    kOGroup, ", 2, ", kBlock, ") = (", NB, ", ", G, ", ", C, ", ", kOGroup, ", 2, ",
                    kBlock, ") for x of shape ", x.sizes(), " and out_channels=", O, ", got ",
                    k.sizes());
  auto out = at::empty({P, O, F}, x.options());
  if (out.numel() == 0) return out;
  if (C == 0) return out.zero_();
  const auto xc = x.resolve_conj().contiguous();
  const auto kc = k.contiguous();
  const Variant variant = pick_variant();
  const int64_t pb = variant.tiles, groups = (P + pb - 1) / pb;
  const MixArgs a{reinterpret_cast<const float*>(xc.const_data_ptr<c10::complex<float>>()),
                  kc.const_data_ptr<float>(),
                  reinterpret_cast<float*>(out.data_ptr<c10::complex<float>>()),
                  C, P, O, F, NB, G, NB * groups};
  const int64_t work = C * G * kOGroup * pb * kBlock;  // complex multiply-adds per item
  at::parallel_for(0, a.items, grain_for(work), [&](int64_t i0, int64_t i1) {
    std::vector<float> xb(static_cast<size_t>(C * pb * 2 * kBlock));
    variant.fn(a, i0, i1, xb.data());
  });
  return out;
}

}  // namespace
}  // namespace fastcount

TORCH_LIBRARY_IMPL(fastcount, CPU, m) { m.impl("spectral_mix", &fastcount::spectral_mix_cpu); }
