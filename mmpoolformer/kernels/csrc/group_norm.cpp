// GroupNorm's statistics (group_norm.py) where each group is one contiguous block of memory: an NCHW
// map, or a channels-last one with one group (PoolFormer's GroupNorm(1, C)), built for the CPU at hand
// by native.py.
//
// One pass over memory that only reads: each block of kBlock values (1024 with AVX-512, 512 with
// AVX2) summed, then its squared deviations from its own mean while it is in L1, in float vectors;
// the blocks then merged exactly in float64 (row_stats), so that the error does not grow with a group
// of millions of values, nor with a mean far from zero. (PyTorch's operators: four passes, two of
// them writing.)
//
// The backbone's emitted maps (group_norm.py): PyTorch's GroupNorm writes a channels-last map, and
// `.contiguous()` then turns it around element by element. Here the normalisation is applied as the
// map is transposed, tile by tile (16 x 16 floats on AVX-512, in registers), writing the NCHW map in
// one pass; in backward, the NCHW gradient is turned channels-last the same way.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::check;
using mmpoolformer::kBlock;
using mmpoolformer::lane_sum;
using mmpoolformer::Vec;

// the sum of a block's values, and of their squared deviations from `center`, each in float vectors
// and then in float64 (a block is kBlock values at most: in L1 for the second pass)
inline double block_sum(const float* values, int64_t count) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) acc = acc + Vec::loadu(values + i);
  double sum = lane_sum(acc);
  for (; i < count; ++i) sum += values[i];
  return sum;
}

inline double block_squares(const float* values, int64_t count, float center) {
  const Vec c(center);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) {
    const Vec d = Vec::loadu(values + i) - c;
    acc = at::vec::fmadd(d, d, acc);
  }
  double sum = lane_sum(acc);
  for (; i < count; ++i) sum += static_cast<double>(values[i] - center) * (values[i] - center);
  return sum;
}

// mean and 1 / sqrt(var + eps) of each row of a (rows, width) float32 tensor, as float32 (rows, ).
// One pass over memory: each block's sum, then (from L1) its squared deviations from its own mean
// rounded to float, m_b; blocks spread over the threads, so a map of two samples uses every thread.
// Then per row, in block order (the same numbers on any number of threads), exactly:
// sum (x - mean)^2 = sum over blocks of [sum (x - m_b)^2 + 2 (m_b - mean) (s_b - n_b m_b)
// + n_b (m_b - mean)^2], every term without cancellation.
std::tuple<at::Tensor, at::Tensor> row_stats(const at::Tensor& x, double eps) {
  check(x, x, "row_stats");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0,
              "row_stats takes (rows, width) tensors of width > 0, got ", x.sizes());
  const int64_t rows = x.size(0), width = x.size(1);
  const int64_t blocks_per_row = (width + kBlock - 1) / kBlock;
  const float* xp = x.const_data_ptr<float>();
  std::vector<double> sums(rows * blocks_per_row), squares(rows * blocks_per_row);
  std::vector<float> centers(rows * blocks_per_row);
  at::parallel_for(0, rows * blocks_per_row, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = (block % blocks_per_row) * kBlock;
      const int64_t count = std::min(kBlock, width - first);
      const float* values = xp + (block / blocks_per_row) * width + first;
      sums[block] = block_sum(values, count);
      centers[block] = static_cast<float>(sums[block] / count);
      squares[block] = block_squares(values, count, centers[block]);
    }
  });
  at::Tensor mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t first = row * blocks_per_row;
    double total = 0.;
    for (int64_t block = first; block < first + blocks_per_row; ++block) total += sums[block];
    const double row_mean = total / width;
    double deviations = 0.;
    for (int64_t block = first; block < first + blocks_per_row; ++block) {
      const int64_t count = std::min(kBlock, width - (block - first) * kBlock);
      const double offset = centers[block] - row_mean;
      const double residue = sums[block] - count * static_cast<double>(centers[block]);
      deviations += squares[block] + 2. * offset * residue + count * offset * offset;
    }
    mp[row] = static_cast<float>(row_mean);
    rp[row] = static_cast<float>(1. / std::sqrt(std::max(deviations, 0.) / width + eps));
  }
  return {mean, rstd};
}

// dst[n, s, r] = a[n, s] * src[n, r, s] + b[n, s], or src[n, r, s] alone without a and b: each
// sample's (R, S) matrix transposed, float32. Tiles of one vector's width each way: transposed into a
// buffer (at::vec's register transpose), then each of its rows scaled, shifted and stored.
void transpose_affine(const at::Tensor& src, const std::optional<at::Tensor>& a,
                      const std::optional<at::Tensor>& b, const at::Tensor& dst) {
  check(src, src, "transpose_affine");
  TORCH_CHECK(src.dim() == 3 && dst.dim() == 3 && dst.size(0) == src.size(0) &&
                  dst.size(1) == src.size(2) && dst.size(2) == src.size(1),
              "transpose_affine takes (N, R, S) into (N, S, R), got ", src.sizes(), " into ",
              dst.sizes());
  check(dst, dst, "transpose_affine");
  TORCH_CHECK(a.has_value() == b.has_value(), "transpose_affine takes a and b together or neither");
  const int64_t n = src.size(0), rows = src.size(1), cols = src.size(2);
  if (a.has_value()) {
    const at::Tensor like = at::empty({n, cols}, src.options());
    check(*a, like, "transpose_affine");
    check(*b, like, "transpose_affine");
  }
  constexpr int64_t T = Vec::size();
  const int64_t row_tiles = (rows + T - 1) / T, col_tiles = (cols + T - 1) / T;
  const float* sp = src.const_data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  const float* ap = a.has_value() ? a->const_data_ptr<float>() : nullptr;
  const float* bp = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  at::parallel_for(0, n * row_tiles * col_tiles, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[T * T];
    for (int64_t index = begin; index < end; ++index) {
      const int64_t sample = index / (row_tiles * col_tiles);
      const int64_t r0 = (index / col_tiles) % row_tiles * T, c0 = index % col_tiles * T;
      const int64_t m = std::min(T, rows - r0), k = std::min(T, cols - c0);
      const float* from = sp + (sample * rows + r0) * cols + c0;
      if (m == T && k == T) {
        at::vec::transpose_mxn<float, T, T>(from, cols, tile, T);
      } else {
        at::vec::transpose_mxn<float>(from, cols, tile, T, static_cast<int>(m), static_cast<int>(k));
      }
      for (int64_t j = 0; j < k; ++j) {  // row c0 + j of the sample's (S, R) output
        const float* row = tile + j * T;
        float* to = dp + (sample * cols + c0 + j) * rows + r0;
        const Vec v = Vec::loadu(row, m);
        const int64_t at = sample * cols + c0 + j;
        (ap ? at::vec::fmadd(v, Vec(ap[at]), Vec(bp[at])) : v).store(to, m);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("row_stats(Tensor x, float eps) -> (Tensor, Tensor)");
  m.impl("row_stats", c10::DispatchKey::CPU, TORCH_FN(row_stats));
  m.def("transpose_affine(Tensor src, Tensor? a, Tensor? b, Tensor(a!) dst) -> ()");
  m.impl("transpose_affine", c10::DispatchKey::CPU, TORCH_FN(transpose_affine));
}
