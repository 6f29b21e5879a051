// The MLP kernel's activations (mlp.py), each in one pass over a chunk of the hidden map, built for the
// CPU at hand by native.py; at::vec gives the AVX2 or AVX-512 instructions the build was told to use.
//
// GELU: backward needs, for every hidden value h, both gelu(h) = h * Phi(h) for fc2's weight gradient
// and gelu'(h) = Phi(h) + h * phi(h) to carry the gradient back through the activation. PyTorch's two
// operators spend three exponentials and two divisions on them. Here erf comes from Abramowitz and
// Stegun's formula 7.1.26 (as in ATen's vectorised erf, |error| < 1.5e-7), whose exp(-h^2 / 2) is also
// the density's: one exponential and one division serve both. The exponential is at::vec's exp_u20,
// inlined (the Sleef call ATen's erf makes stalled this loop), a few units in the last place less
// exact: the results stay within 3e-7 of PyTorch's distance from float64 (tests/test_kernels). Under
// bf16 autocast the MLP kernel's chunks are bfloat16: widened to float, computed, rounded once.
//
// StarReLU, s * relu(h)^2 + b (MetaFormer Baselines): as PyTorch's operators, the forward pass is four
// passes over the hidden map (clamp, square, multiply, add) and the backward six (the value for fc2's
// weight gradient again, the derivative 2 s relu(h), and the sums of g relu(h)^2 and g that are the
// gradients of s and b). Here: one each. The sums go over blocks of a few hundred values in float,
// then into a double per thread, added in thread order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::check;
using mmpoolformer::check_bf16;
using mmpoolformer::kBlock;
using mmpoolformer::lane_sum;
using mmpoolformer::ThreadSums;
using mmpoolformer::Vec;

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
  const Vec t = one / at::vec::fmadd(p, (x * rsqrt2).abs(), one);
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

// value = gelu(h); grad = grad * gelu'(h), in place; float32, or bfloat16 computed in float32 and
// rounded once (as PyTorch's bf16 operators): the MLP kernel's chunks under bf16 autocast
void gelu_value_and_grad(const at::Tensor& h, const at::Tensor& value, const at::Tensor& grad) {
  if (h.scalar_type() == at::kBFloat16) {
    using BVec = at::vec::Vectorized<at::BFloat16>;
    for (const auto* t : {&h, &value, &grad}) check_bf16(*t, h, "gelu_value_and_grad");
    const auto* hp = h.const_data_ptr<at::BFloat16>();
    auto* vp = value.data_ptr<at::BFloat16>();
    auto* gp = grad.data_ptr<at::BFloat16>();
    at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + BVec::size() <= end; i += BVec::size()) {
        const auto [x0, x1] = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(hp + i));
        const auto [g0, g1] = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(gp + i));
        const auto [v0, d0] = gelu_and_grad(x0, g0);
        const auto [v1, d1] = gelu_and_grad(x1, g1);
        at::vec::convert_from_float<at::BFloat16>(v0, v1).store(vp + i);
        at::vec::convert_from_float<at::BFloat16>(d0, d1).store(gp + i);
      }
      for (; i < end; ++i) {
        float v, g = static_cast<float>(gp[i]);
        gelu_and_grad(static_cast<float>(hp[i]), v, g);
        vp[i] = v;
        gp[i] = g;
      }
    });
    return;
  }
  for (const auto* t : {&h, &value, &grad}) check(*t, h, "gelu_value_and_grad");
  const float* hp = h.const_data_ptr<float>();
  float* vp = value.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const auto [v, g] = gelu_and_grad(Vec::loadu(hp + i), Vec::loadu(gp + i));
      v.store(vp + i);
      g.store(gp + i);
    }
    for (; i < end; ++i) gelu_and_grad(hp[i], vp[i], gp[i]);
  });
}

// ------------------------------------------------------------------------------------ StarReLU
// out = scale * relu(h)^2 + bias
void star_relu(const at::Tensor& h, const at::Tensor& out, const at::Tensor& scale,
               const at::Tensor& bias) {
  check(h, h, "star_relu");
  check(out, h, "star_relu");
  const float s = scale.item<float>(), b = bias.item<float>();
  const float* hp = h.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    const Vec vs(s), vb(b), zero(0.f);
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec r = at::vec::maximum(Vec::loadu(hp + i), zero);
      at::vec::fmadd(vs * r, r, vb).store(op + i);
    }
    for (; i < end; ++i) {
      const float r = hp[i] > 0.f ? hp[i] : 0.f;
      op[i] = s * r * r + b;
    }
  });
}

// grad = grad * 2 scale relu(h), in place; value = scale * relu(h)^2 + bias where given. Returns the
// gradients of scale and bias, sum(grad * relu(h)^2) and sum(grad) of the incoming grad, as float64.
at::Tensor star_relu_backward(const at::Tensor& h, const at::Tensor& grad,
                              const std::optional<at::Tensor>& value, const at::Tensor& scale,
                              const at::Tensor& bias) {
  check(h, h, "star_relu_backward");
  check(grad, h, "star_relu_backward");
  const bool with_value = value.has_value() && value->defined();
  if (with_value) check(*value, h, "star_relu_backward");
  const float s = scale.item<float>(), b = bias.item<float>();
  const float* hp = h.const_data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  float* vp = with_value ? value->data_ptr<float>() : nullptr;
  ThreadSums sums(2);  // g relu^2, g
  at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    const Vec vs(s), vb(b), two_s(2.f * s), zero(0.f);
    double sum_gr2 = 0., sum_g = 0.;
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t stop = std::min(block + kBlock, end);
      Vec acc_gr2(0.f), acc_g(0.f);
      int64_t i = block;
      for (; i + Vec::size() <= stop; i += Vec::size()) {
        const Vec r = at::vec::maximum(Vec::loadu(hp + i), zero);
        const Vec g = Vec::loadu(gp + i);
        const Vec gr = g * r;
        acc_gr2 = at::vec::fmadd(gr, r, acc_gr2);
        acc_g = acc_g + g;
        if (vp != nullptr) at::vec::fmadd(vs * r, r, vb).store(vp + i);
        (gr * two_s).store(gp + i);
      }
      sum_gr2 += lane_sum(acc_gr2);
      sum_g += lane_sum(acc_g);
      for (; i < stop; ++i) {
        const float r = hp[i] > 0.f ? hp[i] : 0.f;
        sum_gr2 += static_cast<double>(gp[i]) * r * r;
        sum_g += gp[i];
        if (vp != nullptr) vp[i] = s * r * r + b;
        gp[i] *= 2.f * s * r;
      }
    }
    double* mine = sums.mine();
    mine[0] += sum_gr2;
    mine[1] += sum_g;
  });
  const std::vector<double> totals = sums.totals();
  return at::tensor({totals[0], totals[1]}, at::kDouble);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("gelu_value_and_grad(Tensor h, Tensor(a!) value, Tensor(b!) grad) -> ()");
  m.def("star_relu(Tensor h, Tensor(a!) out, Tensor scale, Tensor bias) -> ()");
  m.def("star_relu_backward(Tensor h, Tensor(a!) grad, Tensor(b!)? value, Tensor scale, "
        "Tensor bias) -> Tensor");
  m.impl("gelu_value_and_grad", c10::DispatchKey::CPU, TORCH_FN(gelu_value_and_grad));
  m.impl("star_relu", c10::DispatchKey::CPU, TORCH_FN(star_relu));
  m.impl("star_relu_backward", c10::DispatchKey::CPU, TORCH_FN(star_relu_backward));
}
