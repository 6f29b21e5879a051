// GELU's value and derivative in one pass over the hidden map: the MLP kernel's backward (mlp.py).
//
// Backward needs both for every hidden value h: gelu(h) = h * Phi(h) for fc2's weight gradient and
// gelu'(h) = Phi(h) + h * phi(h) to carry the gradient back through the activation. PyTorch's two
// operators spend three exponentials and two divisions on them. Here erf comes from Abramowitz and
// Stegun's formula 7.1.26 (as in ATen's vectorised erf, |error| < 1.5e-7), whose exp(-h^2 / 2) is also
// the density's: one exponential and one division serve both. The exponential is at::vec's exp_u20,
// inlined (the Sleef call ATen's erf makes stalled this loop), a few units in the last place less
// exact: the results stay within 3e-7 of PyTorch's distance from float64 (tests/test_kernels).
// Built for the CPU at hand by native.py; at::vec gives the AVX2 or AVX-512 instructions the build
// was told to use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr float kP = 0.3275911f;  // 7.1.26: erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) t exp(-z^2)
constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f, kA4 = -1.453152027f,
                kA5 = 1.061405429f;
constexpr float kRsqrt2 = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kRsqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// value = gelu(h); grad = grad * gelu'(h), in place
void gelu_value_and_grad(const at::Tensor& h, const at::Tensor& value, const at::Tensor& grad) {
  for (const auto* t : {&h, &value, &grad}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "gelu_value_and_grad takes contiguous float32 CPU tensors");
    TORCH_CHECK(t->numel() == h.numel(), "gelu_value_and_grad takes tensors of one size");
  }
  const float* hp = h.const_data_ptr<float>();
  float* vp = value.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, h.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    const Vec one(1.f), half(0.5f), zero(0.f), neg_half(-0.5f), p(kP), rsqrt2(kRsqrt2),
        rsqrt2pi(kRsqrt2Pi), a1(kA1), a2(kA2), a3(kA3), a4(kA4), a5(kA5);
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec x = Vec::loadu(hp + i);
      const Vec t = one / at::vec::fmadd(p, (x * rsqrt2).abs(), one);
      const Vec poly = at::vec::fmadd(
          at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(a5, t, a4), t, a3), t, a2), t, a1) * t;
      const Vec e = (x * x * neg_half).exp_u20();  // exp(-h^2 / 2): erf's exp(-z^2) and the density's
      const Vec erf_abs = one - poly * e;
      const Vec cdf = at::vec::fmadd(half, Vec::blendv(erf_abs, zero - erf_abs, x < zero), half);
      (x * cdf).store(vp + i);
      (Vec::loadu(gp + i) * at::vec::fmadd(x * e, rsqrt2pi, cdf)).store(gp + i);
    }
    for (; i < end; ++i) {
      const float x = hp[i];
      const float cdf = 0.5f * (1.f + std::erf(x * kRsqrt2));
      vp[i] = x * cdf;
      gp[i] *= cdf + x * std::exp(-0.5f * x * x) * kRsqrt2Pi;
    }
  });
}

}  // namespace

TORCH_LIBRARY(mmpoolformer, m) {
  m.def("gelu_value_and_grad(Tensor h, Tensor(a!) value, Tensor(b!) grad) -> ()");
  m.impl("gelu_value_and_grad", c10::DispatchKey::CPU, TORCH_FN(gelu_value_and_grad));
}
