// Channel LayerNorm over rows of tokens (the MetaFormer Baselines' block norms), and the per-sample
// affine map that applies GroupNorm to rows once its statistics are known, for one thread's rows:
// the MLP kernel's chunks (mlp.cpp) and layer_norm.cpp's operators call these.
//
// PyTorch's LayerNorm inside a chunk allocates its output and statistics, then the chunk copies the
// output where the product reads it; on rows of 64 channels its per-row work dominates (ConvFormer-
// S18's stage 0 on the Xeon of 2026-12-04, one thread, 1024 rows: 68 us, and 28 us to copy, for
// 256 KiB). Here each row is summed, then its squared deviations from the mean (two reads from L1,
// as exact as PyTorch's running moments), then normalised straight into the output, float32 or
// bfloat16 (rounded to nearest even, as PyTorch's casts round). The rows themselves may be bfloat16
// (a bf16 map under bf16 autocast): each row is widened once, then normalised as float32 (PyTorch's
// bf16 LayerNorm computes in float32 too, then allocates its output, which the chunk copies: 63
// against 28 us for 1024 rows of 64 channels, one thread, on the Xeon of 2026-12-05).
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

namespace mmpoolformer {

// the first n (at most one vector's) values of v into `to`
inline void store_values(float* to, const Vec& v, int64_t n) { v.store(to, static_cast<int>(n)); }
inline void store_values(at::BFloat16* to, const Vec& v, int64_t n) {
  at::vec::convert_from_float<at::BFloat16>(v, v).store(to, static_cast<int>(n));
}

// value(i, n), the float32 values of columns [i, i + n), stored into a row of `width` columns,
// float32 or bfloat16 (there two vectors rounded into one at a time: half the conversions)
template <typename Out, typename Values>
inline void store_row(Out* to, int64_t width, const Values& value) {
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  if constexpr (std::is_same_v<Out, at::BFloat16>) {
    for (; i + 2 * V <= width; i += 2 * V)
      at::vec::convert_from_float<at::BFloat16>(value(i, V), value(i + V, V)).store(to + i);
  }
  for (; i < width; i += V) {
    const int64_t n = std::min(V, width - i);
    store_values(to + i, value(i, n), n);
  }
}

// fn(pointer to row `first` of `out`), `out` a contiguous float32 or bfloat16 tensor of `width`
// columns (the callers check its dtype), the pointer of its type
template <typename Fn>
inline void with_row_pointer(const at::Tensor& out, int64_t first, int64_t width, const Fn& fn) {
  if (out.scalar_type() == at::kBFloat16) {
    fn(out.data_ptr<at::BFloat16>() + first * width);
  } else {
    fn(out.data_ptr<float>() + first * width);
  }
}

// fn(pointer to the values of `x`), a contiguous float32 or bfloat16 tensor (the callers check its
// dtype), the pointer of its type
template <typename Fn>
inline void with_values(const at::Tensor& x, const Fn& fn) {
  if (x.scalar_type() == at::kBFloat16) {
    fn(x.const_data_ptr<at::BFloat16>());
  } else {
    fn(x.const_data_ptr<float>());
  }
}

// row r of x, `width` values, as float32: the row itself, or bfloat16 values widened into `buffer`
inline const float* float_row(const float* x, int64_t r, int64_t width, float*) { return x + r * width; }
inline const float* float_row(const at::BFloat16* x, int64_t r, int64_t width, float* buffer) {
  constexpr int64_t V = Vec::size();
  const at::BFloat16* row = x + r * width;
  int64_t i = 0;
  for (; i + 2 * V <= width; i += 2 * V) {
    const auto [low, high] =
        at::vec::convert_to_float<at::BFloat16>(at::vec::Vectorized<at::BFloat16>::loadu(row + i));
    low.store(buffer + i);
    high.store(buffer + i + V);
  }
  for (; i < width; ++i) buffer[i] = static_cast<float>(row[i]);
  return buffer;
}

inline float vec_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// the mean of a row and 1 / sqrt(variance + eps)
inline void row_moments(const float* row, int64_t width, float eps, float& mean, float& rstd) {
  constexpr int64_t V = Vec::size();
  const int64_t body = width / V * V;
  Vec acc(0.f);
  for (int64_t i = 0; i < body; i += V) acc = acc + Vec::loadu(row + i);
  float sum = vec_sum(acc);
  for (int64_t i = body; i < width; ++i) sum += row[i];
  mean = sum / static_cast<float>(width);
  const Vec vm(mean);
  Vec squares(0.f);
  for (int64_t i = 0; i < body; i += V) {
    const Vec d = Vec::loadu(row + i) - vm;
    squares = at::vec::fmadd(d, d, squares);
  }
  float variance = vec_sum(squares);
  for (int64_t i = body; i < width; ++i)
    variance = std::fma(row[i] - mean, row[i] - mean, variance);
  rstd = 1.f / std::sqrt(variance / static_cast<float>(width) + eps);
}

// rows [0, rows) of x (float32 or bfloat16), `width` values each, normalised into `out`:
// (x - mean) * rstd * weight + bias (weight and bias: one value per column, or null), each row's mean
// and rstd into `mean`, `rstd`
template <typename In, typename Out>
void layer_norm_rows(const In* x, int64_t rows, int64_t width, const float* weight,
                     const float* bias, float eps, Out* out, float* mean, float* rstd) {
  std::vector<float> widened(std::is_same_v<In, float> ? 0 : width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = float_row(x, r, width, widened.data());
    Out* to = out + r * width;
    row_moments(row, width, eps, mean[r], rstd[r]);
    const Vec vm(mean[r]), vr(rstd[r]);
    // (every product that meets a sum is an explicit fused one, so that the compiler contracts
    // nothing of its own and each instance, float32 or bfloat16, computes the same float32 values)
    const auto normalized = [&](int64_t i, int64_t n) {
      const Vec scale = weight ? vr * Vec::loadu(weight + i, n) : vr;
      const Vec centred = Vec::loadu(row + i, n) - vm;
      return bias ? at::vec::fmadd(centred, scale, Vec::loadu(bias + i, n)) : centred * scale;
    };
    store_row(to, width, normalized);
  }
}

// layer_norm_rows into rows [first, first + rows) of `out`, a contiguous float32 or bfloat16 tensor
// of `width` columns (the callers check its dtype)
template <typename In>
inline void layer_norm_rows_into(const In* x, int64_t rows, int64_t width, const float* weight,
                                 const float* bias, float eps, const at::Tensor& out, int64_t first,
                                 float* mean, float* rstd) {
  with_row_pointer(out, first, width, [&](auto* to) {
    layer_norm_rows(x, rows, width, weight, bias, eps, to, mean, rstd);
  });
}

// rows [0, rows) of x, `width` values each, mapped into `out` by a * x + b (a and b: one value per
// column; GroupNorm's per-sample map): float32, or bfloat16 rounded once from the float32 value
// (PyTorch's addcmul into a bfloat16 tensor computes a float32 result and then copies it rounded,
// twice the time)
template <typename Out>
void affine_rows(const float* x, int64_t rows, int64_t width, const float* a, const float* b, Out* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    store_row(out + r * width, width, [&](int64_t i, int64_t n) {
      return at::vec::fmadd(Vec::loadu(row + i, n), Vec::loadu(a + i, n), Vec::loadu(b + i, n));
    });
  }
}

// affine_rows into rows [first, first + rows) of `out`, a contiguous float32 or bfloat16 tensor of
// `width` columns (the callers check its dtype)
inline void affine_rows_into(const float* x, int64_t rows, int64_t width, const float* a,
                             const float* b, const at::Tensor& out, int64_t first) {
  with_row_pointer(out, first, width, [&](auto* to) { affine_rows(x, rows, width, a, b, to); });
}

// The backward of layer_norm_rows over rows [0, rows): the rows' gradient from the output's `grad`
// into `grad_x`; the weight's and bias's gradients added into `grad_weight`, `grad_bias` (null: not
// needed). With y = (x - mean) * rstd and g = grad * weight, per row:
// grad_x = rstd * (g - mean(g) - y * mean(g * y)). (As in the forward, products meet sums only in
// explicit fused operations: the MLP kernel's two loops, compiled apart, compute alike.) The rows and
// their gradients float32, or bfloat16 (a bf16 map under bf16 autocast): widened a row at a time,
// computed in float32, the rows' gradient rounded once.
template <typename In, typename Out>
void layer_norm_rows_backward(const In* grad, const In* x, const float* mean, const float* rstd,
                              const float* weight, int64_t rows, int64_t width, Out* grad_x,
                              float* grad_weight, float* grad_bias) {
  constexpr int64_t V = Vec::size();
  std::vector<float> widened(std::is_same_v<In, float> ? 0 : 2 * width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = float_row(x, r, width, widened.data());
    const float* g_row = float_row(grad, r, width, widened.data() + width);
    const Vec vm(mean[r]), vr(rstd[r]);
    Vec sum_g(0.f), sum_gy(0.f);
    for (int64_t i = 0; i < width; i += V) {
      const int64_t n = std::min(V, width - i);  // (the partial loads fill the other lanes with 0)
      const Vec y = (Vec::loadu(row + i, n) - vm) * vr, gv = Vec::loadu(g_row + i, n);
      const Vec w = weight ? Vec::loadu(weight + i, n) : Vec(1.f);
      sum_g = at::vec::fmadd(gv, w, sum_g);
      sum_gy = at::vec::fmadd(gv * w, y, sum_gy);
      if (grad_weight)
        store_values(grad_weight + i, at::vec::fmadd(gv, y, Vec::loadu(grad_weight + i, n)), n);
      if (grad_bias) store_values(grad_bias + i, gv + Vec::loadu(grad_bias + i, n), n);
    }
    const Vec a(vec_sum(sum_g) / static_cast<float>(width));
    const Vec b(vec_sum(sum_gy) / static_cast<float>(width));
    store_row(grad_x + r * width, width, [&](int64_t i, int64_t n) {
      const Vec y = (Vec::loadu(row + i, n) - vm) * vr, gv = Vec::loadu(g_row + i, n);
      const Vec w = weight ? Vec::loadu(weight + i, n) : Vec(1.f);
      return vr * at::vec::fnmadd(y, b, at::vec::fmsub(gv, w, a));
    });
  }
}

}  // namespace mmpoolformer
