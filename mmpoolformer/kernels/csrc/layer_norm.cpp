// Channel LayerNorm over rows of tokens and GroupNorm's affine map of rows (layer_norm.h) as
// operators, for the MLP kernel's Python loop (mlp.py's LayerNormRows and GroupNormRows): the rows
// shared out among the threads, the weight's and bias's gradients summed per thread and added in
// thread order (the same sums on the same number of threads).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "layer_norm.h"

namespace {

using at::Tensor;
using mmpoolformer::check;

const float* pointer(const std::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  check(*t, like, name);
  return t->const_data_ptr<float>();
}

// rows of x (float32 or bfloat16, (rows, C)) normalised into `out` (float32 or bfloat16), with each
// row's mean and 1 / sqrt(var + eps) into `mean` and `rstd` (float32, (rows, ) or (rows, 1))
void layer_norm_rows(const Tensor& x, const std::optional<Tensor>& weight,
                     const std::optional<Tensor>& bias, double eps, const Tensor& out,
                     const Tensor& mean, const Tensor& rstd) {
  mmpoolformer::check_float_or_bf16({&x}, "layer_norm_rows");
  TORCH_CHECK(x.dim() == 2, "layer_norm_rows takes (rows, C) tensors, got ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "layer_norm_rows writes a contiguous float32 or bfloat16 tensor of the rows' shape");
  const int64_t rows = x.size(0), width = x.size(1);
  for (const Tensor* stat : {&mean, &rstd})
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->is_contiguous() && stat->numel() == rows,
                "layer_norm_rows writes float32 statistics, one per row");
  const Tensor row_like = at::empty({width}, x.options().dtype(at::kFloat));
  const float *w = pointer(weight, row_like, "layer_norm_rows"),
              *b = pointer(bias, row_like, "layer_norm_rows");
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  mmpoolformer::with_values(x, [&](const auto* xp) {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      mmpoolformer::layer_norm_rows_into(xp + begin * width, end - begin, width, w, b,
                                         static_cast<float>(eps), out, begin, mp + begin, rp + begin);
    });
  });
}

// rows of x (float32, (rows, C)) mapped by a * x + b (float32, (C, ) each) into `out` (float32 or
// bfloat16)
void affine_rows(const Tensor& x, const Tensor& a, const Tensor& b, const Tensor& out) {
  check(x, x, "affine_rows");
  TORCH_CHECK(x.dim() == 2, "affine_rows takes (rows, C) tensors, got ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "affine_rows writes a contiguous float32 or bfloat16 tensor of the rows' shape");
  const int64_t width = x.size(1);
  const Tensor row_like = at::empty({width}, x.options());
  check(a, row_like, "affine_rows");
  check(b, row_like, "affine_rows");
  const float *xp = x.const_data_ptr<float>(), *ap = a.const_data_ptr<float>(),
              *bp = b.const_data_ptr<float>();
  at::parallel_for(0, x.size(0), 64, [&](int64_t begin, int64_t end) {
    mmpoolformer::affine_rows_into(xp + begin * width, end - begin, width, ap, bp, out, begin);
  });
}

// its backward: the rows' gradient into `grad_x`; the weight's and bias's gradients added into
// `grad_weight` and `grad_bias` where given. The rows, their gradient and `grad_x` float32, or all
// bfloat16; statistics, weight and its gradients float32
void layer_norm_rows_backward(const Tensor& grad, const Tensor& x, const Tensor& mean,
                              const Tensor& rstd, const std::optional<Tensor>& weight,
                              const Tensor& grad_x, const std::optional<Tensor>& grad_weight,
                              const std::optional<Tensor>& grad_bias) {
  mmpoolformer::check_float_or_bf16({&x, &grad, &grad_x}, "layer_norm_rows_backward");
  TORCH_CHECK(x.dim() == 2, "layer_norm_rows_backward takes (rows, C) tensors, got ", x.sizes());
  const int64_t rows = x.size(0), width = x.size(1);
  for (const Tensor* stat : {&mean, &rstd})
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->is_contiguous() && stat->numel() == rows,
                "layer_norm_rows_backward takes float32 statistics, one per row");
  const Tensor row_like = at::empty({width}, x.options().dtype(at::kFloat));
  const float* w = pointer(weight, row_like, "layer_norm_rows_backward");
  pointer(grad_weight, row_like, "layer_norm_rows_backward");
  pointer(grad_bias, row_like, "layer_norm_rows_backward");
  const int64_t threads = at::get_num_threads();
  // each thread's sums, the weight's then the bias's, a cache line apart from the next thread's (a
  // line both threads write, every row, costs more than the whole backward)
  constexpr int64_t kLine = 64 / sizeof(float);
  const int64_t slot = (2 * width + kLine - 1) / kLine * kLine + kLine;
  std::vector<float> sums(static_cast<size_t>(threads) * slot, 0.f);
  mmpoolformer::with_values(x, [&](const auto* xp) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const In* gp = grad.const_data_ptr<In>();
    In* gxp = grad_x.data_ptr<In>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      float* mine = sums.data() + at::get_thread_num() * slot;
      const int64_t offset = begin * width;
      mmpoolformer::layer_norm_rows_backward(
          gp + offset, xp + offset, mean.const_data_ptr<float>() + begin,
          rstd.const_data_ptr<float>() + begin, w, end - begin, width, gxp + offset,
          grad_weight.has_value() ? mine : nullptr, grad_bias.has_value() ? mine + width : nullptr);
    });
  });
  const std::optional<Tensor> totals[] = {grad_weight, grad_bias};
  for (int64_t i = 0; i < 2; ++i) {
    if (!totals[i].has_value()) continue;
    float* total = totals[i]->data_ptr<float>();
    for (int64_t thread = 0; thread < threads; ++thread)
      for (int64_t c = 0; c < width; ++c) total[c] += sums[thread * slot + i * width + c];
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("layer_norm_rows(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor(a!) out, "
        "Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  m.def("layer_norm_rows_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor(a!) grad_x, Tensor(b!)? grad_weight, Tensor(c!)? grad_bias) -> ()");
  m.def("affine_rows(Tensor x, Tensor a, Tensor b, Tensor(a!) out) -> ()");
  m.impl("layer_norm_rows", c10::DispatchKey::CPU, TORCH_FN(layer_norm_rows));
  m.impl("affine_rows", c10::DispatchKey::CPU, TORCH_FN(affine_rows));
  m.impl("layer_norm_rows_backward", c10::DispatchKey::CPU, TORCH_FN(layer_norm_rows_backward));
}
