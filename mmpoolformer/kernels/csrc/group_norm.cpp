// GroupNorm's statistics (group_norm.py) where each group is one contiguous block of memory: an NCHW
// map, or a channels-last one with one group (PoolFormer's GroupNorm(1, C)), built for the CPU at hand
// by native.py.
//
// Two passes that only read: the mean, then the squared deviations from it. As PyTorch's operators the
// second is three (the deviations written, squared in place, summed). Each pass sums float vectors
// over blocks of a few hundred values, then the blocks in float64, so that the error does not grow
// with a group of millions of values; the mean's rounding to float before the deviations costs nothing
// a float map could show.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::check;
using mmpoolformer::kBlock;
using mmpoolformer::lane_sum;
using mmpoolformer::ThreadSums;
using mmpoolformer::Vec;

// sum over each row of f(x) (f on vectors and on scalars), rows of `width` values, in float64
template <typename VecFn, typename ScalarFn>
std::vector<double> row_sums(const float* xp, int64_t rows, int64_t width, VecFn vec_fn,
                             ScalarFn scalar_fn) {
  ThreadSums sums(rows);
  // blocks of one row each, spread over the threads: a map of two samples still uses every thread
  const int64_t blocks_per_row = (width + kBlock - 1) / kBlock;
  at::parallel_for(0, rows * blocks_per_row, 16, [&](int64_t begin, int64_t end) {
    double* mine = sums.mine();
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row = block / blocks_per_row, first = (block % blocks_per_row) * kBlock;
      const int64_t stop = std::min(first + kBlock, width);
      const float* values = xp + row * width;
      Vec acc(0.f);
      int64_t i = first;
      for (; i + Vec::size() <= stop; i += Vec::size()) acc = acc + vec_fn(Vec::loadu(values + i));
      double sum = lane_sum(acc);
      for (; i < stop; ++i) sum += scalar_fn(values[i]);
      mine[row] += sum;
    }
  });
  return sums.totals();
}

// mean and 1 / sqrt(var + eps) of each row of a (rows, width) float32 tensor, as float32 (rows, )
std::tuple<at::Tensor, at::Tensor> row_stats(const at::Tensor& x, double eps) {
  check(x, x, "row_stats");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0,
              "row_stats takes (rows, width) tensors of width > 0, got ", x.sizes());
  const int64_t rows = x.size(0), width = x.size(1);
  const float* xp = x.const_data_ptr<float>();
  const std::vector<double> sums = row_sums(
      xp, rows, width, [](const Vec& v) { return v; }, [](float v) { return v; });
  at::Tensor mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) mp[row] = static_cast<float>(sums[row] / width);
  // deviations from each row's own mean: one pass per row keeps the mean a single broadcast
  std::vector<double> squares(rows);
  for (int64_t row = 0; row < rows; ++row) {
    const float m = mp[row];
    const Vec vm(m);
    squares[row] = row_sums(
        xp + row * width, 1, width, [vm](const Vec& v) { const Vec d = v - vm; return d * d; },
        [m](float v) { return (v - m) * (v - m); })[0];
  }
  for (int64_t row = 0; row < rows; ++row)
    rp[row] = static_cast<float>(1. / std::sqrt(squares[row] / width + eps));
  return {mean, rstd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("row_stats(Tensor x, float eps) -> (Tensor, Tensor)");
  m.impl("row_stats", c10::DispatchKey::CPU, TORCH_FN(row_stats));
}
