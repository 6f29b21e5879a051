// The MLP kernel's activations (mlp.py), each in one pass over a chunk of the hidden map, built for the
// CPU at hand by native.py; at::vec gives the AVX2 or AVX-512 instructions the build was told to use.
//
// GELU: backward needs, for every hidden value h, both gelu(h) = h * Phi(h) for fc2's weight gradient
// and gelu'(h) = Phi(h) + h * phi(h) to carry the gradient back through the activation. PyTorch's two
// operators spend three exponentials and two divisions on them. Here erf comes from Abramowitz and
// Stegun's formula 7.1.26 (as in ATen's vectorised erf, |error| < 1.5e-7), whose exp(-h^2 / 2) is also
// the density's: one exponential and one division serve both. The exponential is at::vec's exp_u20,
// inlined (the Sleef call ATen's erf makes stalled this loop), a few units in the last place less
// exact: the results stay within 3e-7 of PyTorch's distance from float64 (tests/test_kernels).
// GELU's forward alone has no density to share: its erf is a rational function, without an exponential
// (below).
//
// StarReLU, s * relu(h)^2 + b (MetaFormer Baselines): as PyTorch's operators, the forward pass is four
// passes over the hidden map (clamp, square, multiply, add) and the backward six (the value for fc2's
// weight gradient again, the derivative 2 s relu(h), and the sums of g relu(h)^2 and g that are the
// gradients of s and b). Here: one each. The sums go over blocks of a few hundred values in float,
// then into a double per thread, added in thread order.
//
// Under bf16 autocast the MLP kernel's chunks are bfloat16, for both: widened to float, computed,
// rounded once (PyTorch's bf16 StarReLU rounds after each of its four operators).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::check;
using mmpoolformer::check_float_or_bf16;
using mmpoolformer::horner;
using mmpoolformer::kBlock;
using mmpoolformer::lane_sum;
using mmpoolformer::ThreadSums;
using mmpoolformer::Vec;

// Two float vectors' worth of values at a time, stored as float or as bfloat16 (under bf16 autocast:
// widened to float, computed, rounded once, as PyTorch's bf16 operators), for both activations
template <typename T>
struct Pairs;

template <>
struct Pairs<float> {
  using T = float;
  static constexpr int64_t size = 2 * Vec::size();
  static std::pair<Vec, Vec> load(const float* p) {
    return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
  }
  static void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <>
struct Pairs<at::BFloat16> {
  using T = at::BFloat16;
  using BVec = at::vec::Vectorized<at::BFloat16>;
  static constexpr int64_t size = BVec::size();
  static std::pair<Vec, Vec> load(const at::BFloat16* p) {
    const auto [a, b] = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(p));
    return {a, b};
  }
  static void store(at::BFloat16* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<at::BFloat16>(a, b).store(p);
  }
};

// ---------------------------------------------------------------------------------------- GELU
constexpr float kP = 0.3275911f;  // 7.1.26: erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) t exp(-z^2)
constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f, kA4 = -1.453152027f,
                kA5 = 1.061405429f;
constexpr float kRsqrt2 = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kRsqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// gelu(x) and gelu'(x) * g, for float vectors
inline std::pair<Vec, Vec> gelu_and_grad(const Vec& x, const Vec& g) {
  const Vec one(1.f), half(0.5f), zero(0.f), neg_half(-0.5f), p(kP), rsqrt2(kRsqrt2),
      rsqrt2pi(kRsqrt2Pi), a1(kA1), a2(kA2), a3(kA3), a4(kA4), a5(kA5);
  const Vec t = mmpoolformer::reciprocal(at::vec::fmadd(p, (x * rsqrt2).abs(), one));
  const Vec poly = at::vec::fmadd(
      at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(a5, t, a4), t, a3), t, a2), t, a1) * t;
  const Vec e = (x * x * neg_half).exp_u20();  // exp(-h^2 / 2): erf's exp(-z^2) and the density's
  const Vec erf_abs = one - poly * e;
  const Vec cdf = at::vec::fmadd(half, Vec::blendv(erf_abs, zero - erf_abs, x < zero), half);
  return {x * cdf, g * at::vec::fmadd(x * e, rsqrt2pi, cdf)};
}

inline void gelu_and_grad(float x, float& value, float& grad) {
  const float cdf = 0.5f * (1.f + std::erf(x * kRsqrt2));
  value = x * cdf;
  grad *= cdf + x * std::exp(-0.5f * x * x) * kRsqrt2Pi;
}

// value = gelu(h); grad = grad * gelu'(h), in place, over [begin, end)
template <typename P, typename T = typename P::T>
void gelu_and_grad_range(const T* hp, T* vp, T* gp, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + P::size <= end; i += P::size) {
    const auto [x0, x1] = P::load(hp + i);
    const auto [g0, g1] = P::load(gp + i);
    const auto [v0, d0] = gelu_and_grad(x0, g0);
    const auto [v1, d1] = gelu_and_grad(x1, g1);
    P::store(vp + i, v0, v1);
    P::store(gp + i, d0, d1);
  }
  for (; i < end; ++i) {
    float v, g = static_cast<float>(gp[i]);
    gelu_and_grad(static_cast<float>(hp[i]), v, g);
    vp[i] = v;
    gp[i] = g;
  }
}

// GELU's value alone (forward): x / 2 * (1 + erf(x / sqrt(2))), erf from a rational function instead,
// erf(u) = u P(u^2) / Q(u^2) for |u| <= 3.92 (beyond it float32's erf is +-1), fitted in float64 by
// least squares reweighted toward the smallest largest error (|error| < 2e-8 in float64; within 1.1e-6
// of float64 in float32 over [-8, 8], where PyTorch's vectorised GELU is within 1.3e-6). Without an
// exponential it takes half the time of PyTorch's GELU (Zen 4, AVX-512, in cache: 2.8-3.0 against
// 1.4 billion values a second on one thread). Backward keeps 7.1.26: its exponential is needed there.
constexpr float kErfP[] = {1.128378987312317f, 0.19275611639022827f, 0.05305943638086319f,
                           0.0038679835852235556f, 0.00028747107717208564f, 2.0347911231510807e-06f};
constexpr float kErfQ[] = {1.f, 0.504157304763794f, 0.11508134007453918f, 0.015171614475548267f,
                           0.001188030350022018f, 3.807078246609308e-05f};
constexpr float kErfEnd = 3.92f;

inline Vec gelu_value(const Vec& x) {
  const Vec u = at::vec::clamp(x * Vec(kRsqrt2), Vec(-kErfEnd), Vec(kErfEnd));
  const Vec t = u * u;
  const Vec erf = at::vec::clamp(u * horner(kErfP, t) / horner(kErfQ, t), Vec(-1.f), Vec(1.f));
  const Vec half_x = x * Vec(0.5f);
  return at::vec::fmadd(half_x, erf, half_x);
}

template <typename P, typename T = typename P::T>
void gelu_range(const T* hp, T* op, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + P::size <= end; i += P::size) {
    const auto [x0, x1] = P::load(hp + i);
    P::store(op + i, gelu_value(x0), gelu_value(x1));
  }
  for (; i < end; ++i) {
    const float x = static_cast<float>(hp[i]);
    op[i] = 0.5f * x * (1.f + std::erf(x * kRsqrt2));
  }
}

// ------------------------------------------------------------------------------------ StarReLU
// out = scale * relu(h)^2 + bias, over [begin, end)
template <typename P, typename T = typename P::T>
void star_relu_range(const T* hp, T* op, float s, float b, int64_t begin, int64_t end) {
  const Vec vs(s), vb(b), zero(0.f);
  int64_t i = begin;
  for (; i + P::size <= end; i += P::size) {
    auto [r0, r1] = P::load(hp + i);
    r0 = at::vec::maximum(r0, zero);
    r1 = at::vec::maximum(r1, zero);
    P::store(op + i, at::vec::fmadd(vs * r0, r0, vb), at::vec::fmadd(vs * r1, r1, vb));
  }
  for (; i < end; ++i) {
    const float r = std::max(static_cast<float>(hp[i]), 0.f);
    op[i] = s * r * r + b;
  }
}

// grad = grad * 2 scale relu(h), in place; value = scale * relu(h)^2 + bias where vp is given; the
// sums of grad * relu(h)^2 and of grad (the incoming grad) over [begin, end) added into this
// thread's slots 0 and 1 of `sums`
template <typename P, typename T = typename P::T>
void star_relu_backward_range(const T* hp, T* gp, T* vp, float s, float b, ThreadSums* sums,
                              int64_t begin, int64_t end) {
  const Vec vs(s), vb(b), two_s(2.f * s), zero(0.f);
  double sum_gr2 = 0., sum_g = 0.;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t stop = std::min(block + kBlock, end);
    Vec acc_gr2(0.f), acc_g(0.f);
    int64_t i = block;
    for (; i + P::size <= stop; i += P::size) {
      auto [r0, r1] = P::load(hp + i);
      r0 = at::vec::maximum(r0, zero);
      r1 = at::vec::maximum(r1, zero);
      const auto [g0, g1] = P::load(gp + i);
      const Vec gr0 = g0 * r0, gr1 = g1 * r1;
      acc_gr2 = at::vec::fmadd(gr1, r1, at::vec::fmadd(gr0, r0, acc_gr2));
      acc_g = acc_g + g0 + g1;
      if (vp != nullptr) {
        P::store(vp + i, at::vec::fmadd(vs * r0, r0, vb), at::vec::fmadd(vs * r1, r1, vb));
      }
      P::store(gp + i, gr0 * two_s, gr1 * two_s);
    }
    sum_gr2 += lane_sum(acc_gr2);
    sum_g += lane_sum(acc_g);
    for (; i < stop; ++i) {
      const float r = std::max(static_cast<float>(hp[i]), 0.f), g = static_cast<float>(gp[i]);
      sum_gr2 += static_cast<double>(g) * r * r;
      sum_g += g;
      if (vp != nullptr) vp[i] = s * r * r + b;
      gp[i] = g * (2.f * s * r);
    }
  }
  double* mine = sums->mine();
  mine[0] += sum_gr2;
  mine[1] += sum_g;
}

// ---------------------------------------------------------------------------------- the passes
// bfloat16 rounded by the CPU's own instruction, where it has avx512_bf16: one instruction for 32
// values where at::vec's rounding takes a dozen integer ones, to the same results (round to nearest
// even), except that it flushes subnormal floats (below 1.2e-38) to zero, as oneDNN's bf16 kernels
// do (keeping them cost a test per vector and the whole gain). GELU's passes over a bf16 chunk take
// 15-20% less time on the Xeon; S12's bf16 training step 2.4% less (paired), ConvFormer-S18's
// 1.8%. Each loop above is written once, over a policy P (Pairs<T> or NativeBf16); its NativeBf16
// instance is compiled for avx512_bf16 in the wrappers below (`flatten`: the loop and its store
// inlined into a function allowed the instruction) and called only where cpu_rounds_bf16().
#if defined(CPU_CAPABILITY_AVX512)
bool cpu_rounds_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#define MMPF_INLINED __attribute__((flatten))
struct NativeBf16 : Pairs<at::BFloat16> {
  static void store(at::BFloat16* p, const Vec& a, const Vec& b) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(__m512(b), __m512(a)));
  }
};
#else  // (AVX2: never chosen)
bool cpu_rounds_bf16() { return false; }
#define MMPF_INLINED
using NativeBf16 = Pairs<at::BFloat16>;
#endif
using BF16 = at::BFloat16;
MMPF_INLINED void gelu_and_grad_native(const BF16* hp, BF16* vp, BF16* gp, int64_t begin,
                                       int64_t end) {
  gelu_and_grad_range<NativeBf16>(hp, vp, gp, begin, end);
}
MMPF_INLINED void gelu_native(const BF16* hp, BF16* op, int64_t begin, int64_t end) {
  gelu_range<NativeBf16>(hp, op, begin, end);
}
MMPF_INLINED void star_relu_native(const BF16* hp, BF16* op, float s, float b, int64_t begin,
                                   int64_t end) {
  star_relu_range<NativeBf16>(hp, op, s, b, begin, end);
}
MMPF_INLINED void star_relu_backward_native(const BF16* hp, BF16* gp, BF16* vp, float s, float b,
                                            ThreadSums* sums, int64_t begin, int64_t end) {
  star_relu_backward_range<NativeBf16>(hp, gp, vp, s, b, sums, begin, end);
}
#undef MMPF_INLINED
#if defined(CPU_CAPABILITY_AVX512)
#pragma GCC pop_options
#endif

// range(args..., begin, end) over [0, n) on PyTorch's threads
template <typename Range, typename... Args>
void over_threads(int64_t n, Range range, Args... args) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE,
                   [&](int64_t begin, int64_t end) { range(args..., begin, end); });
}

// a bfloat16 loop: its native instance where the CPU rounds bf16 itself
template <typename Range>
Range bf16_loop(Range portable, Range native) {
  return cpu_rounds_bf16() ? native : portable;
}

// float32, or bfloat16 computed in float32 and rounded once (as PyTorch's bf16 operators): the MLP
// kernel's chunks under bf16 autocast
void gelu_value_and_grad(const at::Tensor& h, const at::Tensor& value, const at::Tensor& grad) {
  if (check_float_or_bf16({&h, &value, &grad}, "gelu_value_and_grad")) {
    over_threads(h.numel(), bf16_loop(gelu_and_grad_range<Pairs<BF16>>, gelu_and_grad_native),
                 h.const_data_ptr<BF16>(), value.data_ptr<BF16>(), grad.data_ptr<BF16>());
  } else {
    over_threads(h.numel(), gelu_and_grad_range<Pairs<float>>, h.const_data_ptr<float>(),
                 value.data_ptr<float>(), grad.data_ptr<float>());
  }
}

// out = gelu(h): float32, or bfloat16 computed in float32 and rounded once
void gelu(const at::Tensor& h, const at::Tensor& out) {
  if (check_float_or_bf16({&h, &out}, "gelu")) {
    over_threads(h.numel(), bf16_loop(gelu_range<Pairs<BF16>>, gelu_native),
                 h.const_data_ptr<BF16>(), out.data_ptr<BF16>());
  } else {
    over_threads(h.numel(), gelu_range<Pairs<float>>, h.const_data_ptr<float>(),
                 out.data_ptr<float>());
  }
}

// h += bias (a row's worth, added to each row) and out = gelu(h), float32 (rows, width): fc1's bias
// added where its output is activated, not by the product (PyTorch's addmm first writes the bias over
// the whole output, a pass of its own); the same numbers as h.add_(bias) and then gelu where the
// width is a whole number of vectors (every MLP's hidden width of the released models). `out` may be
// `h` itself (inference, where the sum is not kept): then only the activation is stored.
void bias_gelu(const at::Tensor& h, const at::Tensor& bias, const at::Tensor& out) {
  check(h, h, "bias_gelu");
  check(out, h, "bias_gelu");
  TORCH_CHECK(h.dim() == 2, "bias_gelu takes (rows, width) tensors, got ", h.sizes());
  const int64_t width = h.size(1);
  check(bias, at::empty({width}, h.options()), "bias_gelu");
  float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  at::parallel_for(0, h.size(0), std::max<int64_t>(1, at::internal::GRAIN_SIZE / width),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* x = hp + row * width;
      float* y = op + row * width;
      int64_t c = 0;
      for (; c + Vec::size() <= width; c += Vec::size()) {
        const Vec v = Vec::loadu(x + c) + Vec::loadu(bp + c);
        if (y != x) v.store(x + c);
        gelu_value(v).store(y + c);
      }
      for (; c < width; ++c) {
        x[c] += bp[c];
        y[c] = 0.5f * x[c] * (1.f + std::erf(x[c] * kRsqrt2));
      }
    }
  });
}

void star_relu(const at::Tensor& h, const at::Tensor& out, const at::Tensor& scale,
               const at::Tensor& bias) {
  const float s = scale.item<float>(), b = bias.item<float>();
  if (check_float_or_bf16({&h, &out}, "star_relu")) {
    over_threads(h.numel(), bf16_loop(star_relu_range<Pairs<BF16>>, star_relu_native),
                 h.const_data_ptr<BF16>(), out.data_ptr<BF16>(), s, b);
  } else {
    over_threads(h.numel(), star_relu_range<Pairs<float>>, h.const_data_ptr<float>(),
                 out.data_ptr<float>(), s, b);
  }
}

// grad = grad * 2 scale relu(h), in place; value = scale * relu(h)^2 + bias where given. Returns the
// gradients of scale and bias, sum(grad * relu(h)^2) and sum(grad) of the incoming grad, as float64.
at::Tensor star_relu_backward(const at::Tensor& h, const at::Tensor& grad,
                              const std::optional<at::Tensor>& value, const at::Tensor& scale,
                              const at::Tensor& bias) {
  const bool with_value = value.has_value() && value->defined();
  const bool bf16 = with_value ? check_float_or_bf16({&h, &grad, &*value}, "star_relu_backward")
                               : check_float_or_bf16({&h, &grad}, "star_relu_backward");
  const float s = scale.item<float>(), b = bias.item<float>();
  ThreadSums sums(2);  // g relu^2, g
  if (bf16) {
    over_threads(h.numel(), bf16_loop(star_relu_backward_range<Pairs<BF16>>,
                                      star_relu_backward_native),
                 h.const_data_ptr<BF16>(), grad.data_ptr<BF16>(),
                 with_value ? value->data_ptr<BF16>() : nullptr, s, b, &sums);
  } else {
    over_threads(h.numel(), star_relu_backward_range<Pairs<float>>, h.const_data_ptr<float>(),
                 grad.data_ptr<float>(), with_value ? value->data_ptr<float>() : nullptr, s, b,
                 &sums);
  }
  const std::vector<double> totals = sums.totals();
  return at::tensor({totals[0], totals[1]}, at::kDouble);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("gelu(Tensor h, Tensor(a!) out) -> ()");
  m.def("bias_gelu(Tensor(a!) h, Tensor bias, Tensor(b!) out) -> ()");
  m.def("gelu_value_and_grad(Tensor h, Tensor(a!) value, Tensor(b!) grad) -> ()");
  m.def("star_relu(Tensor h, Tensor(a!) out, Tensor scale, Tensor bias) -> ()");
  m.def("star_relu_backward(Tensor h, Tensor(a!) grad, Tensor(b!)? value, Tensor scale, "
        "Tensor bias) -> Tensor");
  m.impl("gelu", c10::DispatchKey::CPU, TORCH_FN(gelu));
  m.impl("bias_gelu", c10::DispatchKey::CPU, TORCH_FN(bias_gelu));
  m.impl("gelu_value_and_grad", c10::DispatchKey::CPU, TORCH_FN(gelu_value_and_grad));
  m.impl("star_relu", c10::DispatchKey::CPU, TORCH_FN(star_relu));
  m.impl("star_relu_backward", c10::DispatchKey::CPU, TORCH_FN(star_relu_backward));
}
