// The pooling branch of a PoolFormer block (pooling.py), r * x + s * (pool(x) - x), over a channels-last
// map in one pass each way, built for the CPU at hand by native.py.
//
// pool is PoolFormer's k x k average, stride 1, padding k / 2, counting only the values inside the map.
// As PyTorch's operators, forward is two passes (avg_pool2d, then the interpolation that reads the map
// again) and backward four (avg_pool2d_backward, the difference, its product with x summed per channel,
// the input's gradient in three more element-wise operators). Here forward is one pass: each token's
// window is summed from its neighbours, still in cache, and mixed with the token at once. Backward is
// two: the adjoint of the mixing together with its per-channel sums against x, then the input's
// gradient, once the sums have given the statistics' share of it.
//
// A token row holds its C channels side by side, so every operation runs over channels in vectors; the
// window's rows and columns come from the token's position (fewer at the edges, as is the count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::check;
using mmpoolformer::ThreadSums;
using mmpoolformer::Vec;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// The window of position i along a side of n: [first, last], of last - first + 1 values.
struct Window {
  int64_t first, last;
  Window(int64_t i, int64_t n, int64_t pad) : first(std::max<int64_t>(i - pad, 0)),
                                              last(std::min(i + pad, n - 1)) {}
  int64_t size() const { return last - first + 1; }
};

// A per-(sample, channel) float32 coefficient tensor of shape (N, C), or a (C, ) one.
const float* coefficients(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() &&
                  t.sizes() == shape,
              name, " takes float32 CPU coefficients of shape ", shape, ", got ", t.sizes());
  return t.const_data_ptr<float>();
}

void check_map(const at::Tensor& x, int64_t kernel, const char* name) {
  check(x, x, name, kChannelsLast);
  TORCH_CHECK(x.dim() == 4, name, " takes (N, C, H, W) maps, got ", x.dim(), " dimensions");
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, name, " takes an odd pool size, got ", kernel);
}

// y[c] = a[c] * u[c] + b[c] * v[c] (+ e[c] * w[c] where e is given) + d[c] (where d is given), over C
// channels; the coefficient arrays are per channel
inline void mix(float* y, const float* u, const float* a, const float* v, const float* b,
                const float* w, const float* e, const float* d, int64_t channels) {
  int64_t c = 0;
  for (; c + Vec::size() <= channels; c += Vec::size()) {
    Vec out = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(u + c),
                             Vec::loadu(b + c) * Vec::loadu(v + c));
    if (e != nullptr) out = at::vec::fmadd(Vec::loadu(e + c), Vec::loadu(w + c), out);
    if (d != nullptr) out = out + Vec::loadu(d + c);
    out.store(y + c);
  }
  for (; c < channels; ++c) {
    float out = a[c] * u[c] + b[c] * v[c];
    if (e != nullptr) out += e[c] * w[c];
    if (d != nullptr) out += d[c];
    y[c] = out;
  }
}

// out = res_scale * x + scale * (pool(x) - x); scale (N, C), res_scale (C, ) or none (one)
void pool_mix(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& res_scale,
              const at::Tensor& out, int64_t kernel) {
  check_map(x, kernel, "pool_mix");
  check(out, x, "pool_mix", kChannelsLast);
  const int64_t n = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3),
                pad = kernel / 2;
  const float* s = coefficients(scale, {n, channels}, "pool_mix");
  const float* r = res_scale.has_value() && res_scale->defined()
                       ? coefficients(*res_scale, {channels}, "pool_mix") : nullptr;
  // out = (r - s) * x + s * pool(x): the first coefficient per (sample, channel)
  std::vector<float> keep(n * channels);
  for (int64_t i = 0; i < n * channels; ++i) keep[i] = (r != nullptr ? r[i % channels] : 1.f) - s[i];
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row = width * channels;
  at::parallel_for(0, n * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(channels);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t sample = nh / height;
      const Window rows(nh % height, height, pad);
      const float* sample_x = xp + sample * height * row;
      for (int64_t w = 0; w < width; ++w) {
        const Window cols(w, width, pad);
        const Vec inv(1.f / static_cast<float>(rows.size() * cols.size()));
        int64_t c = 0;
        for (; c + Vec::size() <= channels; c += Vec::size()) {
          Vec sum(0.f);
          for (int64_t hh = rows.first; hh <= rows.last; ++hh)
            for (int64_t ww = cols.first; ww <= cols.last; ++ww)
              sum = sum + Vec::loadu(sample_x + hh * row + ww * channels + c);
          (sum * inv).store(pooled.data() + c);
        }
        for (; c < channels; ++c) {
          float sum = 0.f;
          for (int64_t hh = rows.first; hh <= rows.last; ++hh)
            for (int64_t ww = cols.first; ww <= cols.last; ++ww)
              sum += sample_x[hh * row + ww * channels + c];
          pooled[c] = sum / static_cast<float>(rows.size() * cols.size());
        }
        const int64_t pos = nh * row + w * channels;
        mix(op + pos, xp + pos, keep.data() + sample * channels, pooled.data(), s + sample * channels,
            nullptr, nullptr, nullptr, channels);
      }
    }
  });
}

// mixed = pool^T(grad) - grad, with pool^T the pooling's adjoint (each value's share of the windows
// that hold it). Returns sum over positions of mixed * x, per (sample, channel), as (N, C) float64.
at::Tensor pool_mix_adjoint(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mixed,
                            int64_t kernel) {
  check_map(x, kernel, "pool_mix_adjoint");
  check(grad, x, "pool_mix_adjoint", kChannelsLast);
  check(mixed, x, "pool_mix_adjoint", kChannelsLast);
  const int64_t n = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3),
                pad = kernel / 2;
  // the share of a window's each value: 1 / (its rows * its columns), separable
  std::vector<float> row_share(height), col_share(width);
  for (int64_t h = 0; h < height; ++h)
    row_share[h] = 1.f / static_cast<float>(Window(h, height, pad).size());
  for (int64_t w = 0; w < width; ++w)
    col_share[w] = 1.f / static_cast<float>(Window(w, width, pad).size());
  const float* gp = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* mp = mixed.data_ptr<float>();
  const int64_t row = width * channels;
  ThreadSums sums(n * channels);
  at::parallel_for(0, n * height, 1, [&](int64_t begin, int64_t end) {
    double* mine = sums.mine();
    std::vector<float> row_sums(channels);  // one row's terms in float, then into the double
    std::vector<Vec> shares(kernel * kernel);  // of the window's values, row by row
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t sample = nh / height;
      const Window rows(nh % height, height, pad);  // (the windows that hold a token: its own window)
      const float* sample_g = gp + sample * height * row;
      std::fill(row_sums.begin(), row_sums.end(), 0.f);
      for (int64_t w = 0; w < width; ++w) {
        const Window cols(w, width, pad);
        const int64_t pos = nh * row + w * channels;
        Vec* share = shares.data();
        for (int64_t hh = rows.first; hh <= rows.last; ++hh)
          for (int64_t ww = cols.first; ww <= cols.last; ++ww)
            *share++ = Vec(row_share[hh] * col_share[ww]);
        int64_t c = 0;
        for (; c + Vec::size() <= channels; c += Vec::size()) {
          Vec sum(0.f);
          share = shares.data();
          for (int64_t hh = rows.first; hh <= rows.last; ++hh)
            for (int64_t ww = cols.first; ww <= cols.last; ++ww)
              sum = at::vec::fmadd(*share++, Vec::loadu(sample_g + hh * row + ww * channels + c), sum);
          const Vec m = sum - Vec::loadu(gp + pos + c);
          m.store(mp + pos + c);
          at::vec::fmadd(m, Vec::loadu(xp + pos + c), Vec::loadu(row_sums.data() + c))
              .store(row_sums.data() + c);
        }
        for (; c < channels; ++c) {
          float sum = 0.f;
          for (int64_t hh = rows.first; hh <= rows.last; ++hh)
            for (int64_t ww = cols.first; ww <= cols.last; ++ww)
              sum += row_share[hh] * col_share[ww] * sample_g[hh * row + ww * channels + c];
          mp[pos + c] = sum - gp[pos + c];
          row_sums[c] += mp[pos + c] * xp[pos + c];
        }
      }
      for (int64_t c = 0; c < channels; ++c) mine[sample * channels + c] += row_sums[c];
    }
  });
  const std::vector<double> totals = sums.totals();
  return at::tensor(totals, at::kDouble).view({n, channels});
}

// mixed = scale * mixed + res_scale * grad + coef * x + shift, in place: the input's gradient from the
// adjoint's; scale, coef, shift (N, C), res_scale (C, ) or none (one)
void pool_mix_input_grad(const at::Tensor& mixed, const at::Tensor& grad, const at::Tensor& x,
                         const at::Tensor& scale, const std::optional<at::Tensor>& res_scale,
                         const at::Tensor& coef, const at::Tensor& shift) {
  check_map(x, 1, "pool_mix_input_grad");
  check(grad, x, "pool_mix_input_grad", kChannelsLast);
  check(mixed, x, "pool_mix_input_grad", kChannelsLast);
  const int64_t n = x.size(0), channels = x.size(1), tokens = x.size(2) * x.size(3);
  const std::vector<int64_t> shape{n, channels};
  const float* s = coefficients(scale, shape, "pool_mix_input_grad");
  const float* k = coefficients(coef, shape, "pool_mix_input_grad");
  const float* d = coefficients(shift, shape, "pool_mix_input_grad");
  std::vector<float> ones(channels, 1.f);
  const float* r = res_scale.has_value() && res_scale->defined()
                       ? coefficients(*res_scale, {channels}, "pool_mix_input_grad") : ones.data();
  const float* gp = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* mp = mixed.data_ptr<float>();
  at::parallel_for(0, n * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t sample = token / tokens, pos = token * channels, coef_at = sample * channels;
      mix(mp + pos, mp + pos, s + coef_at, gp + pos, r, xp + pos, k + coef_at, d + coef_at, channels);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("pool_mix(Tensor x, Tensor scale, Tensor? res_scale, Tensor(a!) out, int kernel) -> ()");
  m.def("pool_mix_adjoint(Tensor grad, Tensor x, Tensor(a!) mixed, int kernel) -> Tensor");
  m.def("pool_mix_input_grad(Tensor(a!) mixed, Tensor grad, Tensor x, Tensor scale, Tensor? res_scale, "
        "Tensor coef, Tensor shift) -> ()");
  m.impl("pool_mix", c10::DispatchKey::CPU, TORCH_FN(pool_mix));
  m.impl("pool_mix_adjoint", c10::DispatchKey::CPU, TORCH_FN(pool_mix_adjoint));
  m.impl("pool_mix_input_grad", c10::DispatchKey::CPU, TORCH_FN(pool_mix_input_grad));
}
