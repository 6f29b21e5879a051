// Multi-head attention's forward pass, softmax(q k^T * scale) v, for blocks of 32 queries of one head
// at a time, the blocks shared out among the threads. Per block: the scores of every key, transposed
// (a row per key, the block's queries along it), with each query's largest score kept as they are
// made; the exponentials in place, summed per query; then the values weighted by them, each output
// row divided by its sum once. Both products keep their tile in registers over the whole head
// dimension (scores) or over all keys (values), so neither loads or stores partial sums, and the
// transposed scores make every pass a vector one: no packing of the keys, which are read where the
// qkv projection left them (rows of a strided view).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using at::Tensor;
using mmpoolformer::horner;
using mmpoolformer::Vec;

constexpr int64_t kQueries = 32;  // a block's queries: its transposed scores, keys x 32, stay in L2
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRows = 8;  // rows of a register tile (8 x 2 vectors of 16: 16 of the 32 registers)
#else
constexpr int kRows = 6;  // (AVX2: 6 x 2 vectors of 8, 12 of the 16 registers)
#endif
constexpr int64_t kTile = 2 * Vec::size();     // a scores tile's queries: two vectors
constexpr int64_t kVectors = kQueries / Vec::size();  // a block's queries in vectors

// 2^t for t <= 0 (a score less the largest, scaled, in base 2), to 2.3e-7 relative: a degree-5
// polynomial of the fraction fitted to 2^f on [-1/2, 1/2], the exponent put in by one instruction
// with AVX-512 (vscalefps), added to the float's exponent bits with AVX2. Zero below 2^-64: the
// weights then sum to at least 1 and lose nothing, and neither they nor their products with the
// values are ever subnormal, which Intel CPUs compute in microcode (a weighted sum of values took 3
// times as long).
constexpr float kExp2[] = {1.00000012f, 0.693146944f, 0.240221202f, 0.0555071309f, 0.00967554189f,
                           0.00132764725f};

inline Vec exp2_nonpositive(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec p = horner(kExp2, Vec(_mm512_sub_ps(t, n)));
  return Vec(_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-64.f), _CMP_GE_OQ), p, n));
#else
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec p = horner(kExp2, Vec(_mm256_sub_ps(t, n)));
  // 2^n as a float's exponent bits (n >= -64 where kept: a normal number)
  const __m256 power = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return Vec(_mm256_and_ps(_mm256_mul_ps(p, power), _mm256_cmp_ps(t, _mm256_set1_ps(-64.f), _CMP_GE_OQ)));
#endif
}

// scores[r, :kTile] = keys[r] . queries_t[:, :kTile] for `rows` keys, each tile column's largest
// value into `largest`
template <int rows>
inline void scores_tile(const float* keys, int64_t key_stride, const float* queries_t, int64_t width,
                        int64_t dim, float* scores, Vec* largest) {
  Vec acc[rows][2];
  for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  for (int64_t e = 0; e < dim; ++e) {
    const Vec b0 = Vec::loadu(queries_t + e * width), b1 = Vec::loadu(queries_t + e * width + Vec::size());
    for (int r = 0; r < rows; ++r) {
      const Vec a(keys[r * key_stride + e]);
      acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < 2; ++u) {
      acc[r][u].store(scores + r * width + u * Vec::size());
      largest[u] = at::vec::maximum(largest[u], acc[r][u]);
    }
}

// out[r, :] = sum over keys j of weights_t[j, r] values[j, :], times inverse[r], for `rows` queries;
// the head dimension `vectors` vectors
template <int rows, int vectors>
inline void values_tile(const float* weights_t, int64_t width, const float* values, int64_t value_stride,
                        int64_t keys, const float* inverse, float* out, int64_t out_stride) {
  Vec acc[rows][vectors];
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < vectors; ++u) acc[r][u] = Vec(0.f);
  for (int64_t j = 0; j < keys; ++j) {
    Vec b[vectors];
    for (int u = 0; u < vectors; ++u) b[u] = Vec::loadu(values + j * value_stride + u * Vec::size());
    for (int r = 0; r < rows; ++r) {
      const Vec a(weights_t[j * width + r]);
      for (int u = 0; u < vectors; ++u) acc[r][u] = at::vec::fmadd(a, b[u], acc[r][u]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < vectors; ++u)
      (acc[r][u] * Vec(inverse[r])).store(out + r * out_stride + u * Vec::size());
}

template <int vectors>
void attend(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int kValueRows = kRows;
#else
  constexpr int kValueRows = std::max(1, 2 * kRows / vectors);  // (12 accumulators at most)
#endif
  const int64_t n = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3),
                keys = k.size(2);
  const int64_t blocks = (length + kQueries - 1) / kQueries;
  const float base2 = scale * 1.4426950408889634f;  // scores to powers of 2: scale * log2(e)
  const float *qp = q.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(),
              *vp = v.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t out_stride = heads * dim, q_row = q.stride(2);
  // keys and values of one head read where they lie unless their rows spread over more than 4 MiB
  // (1024 pages: more than the TLBs hold; a head of 4200 keys then took twice as long); then each
  // thread copies a head's rows together when it starts on the head
  const bool pack = keys * std::max(k.stride(2), v.stride(2)) * 4 > (int64_t{4} << 20);
  at::parallel_for(0, n * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores_t(keys * kQueries), queries_t(dim * kQueries), inverse(kQueries);
    std::vector<float> packed(pack ? 2 * keys * dim : 0);
    int64_t packed_head = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / blocks / heads, head = task / blocks % heads;
      const int64_t first = task % blocks * kQueries, count = std::min(kQueries, length - first);
      const int64_t width = (count + kTile - 1) / kTile * kTile;  // the block's queries, padded
      const float* qb = qp + sample * q.stride(0) + head * q.stride(1) + first * q.stride(2);
      const float* kb = kp + sample * k.stride(0) + head * k.stride(1);
      const float* vb = vp + sample * v.stride(0) + head * v.stride(1);
      int64_t k_row = k.stride(2), v_row = v.stride(2);
      if (pack) {
        if (packed_head != task / blocks) {
          for (int64_t j = 0; j < keys; ++j) {
            std::copy(kb + j * k_row, kb + j * k_row + dim, packed.data() + j * dim);
            std::copy(vb + j * v_row, vb + j * v_row + dim, packed.data() + (keys + j) * dim);
          }
          packed_head = task / blocks;
        }
        kb = packed.data();
        vb = packed.data() + keys * dim;
        k_row = v_row = dim;
      }
      for (int64_t i = 0; i < width; ++i)  // (padding queries: zeros, scores zero, never written)
        for (int64_t e = 0; e < dim; ++e)
          queries_t[e * width + i] = i < count ? qb[i * q_row + e] : 0.f;
      Vec largest[kVectors];
      for (int64_t c = 0; c < width; c += kTile) {
        Vec tile_largest[2] = {Vec(-std::numeric_limits<float>::infinity()),
                               Vec(-std::numeric_limits<float>::infinity())};
        int64_t j = 0;
        for (; j + kRows <= keys; j += kRows)
          scores_tile<kRows>(kb + j * k_row, k_row, queries_t.data() + c, width, dim,
                             scores_t.data() + j * width + c, tile_largest);
        for (; j < keys; ++j)
          scores_tile<1>(kb + j * k_row, k_row, queries_t.data() + c, width, dim,
                         scores_t.data() + j * width + c, tile_largest);
        largest[c / Vec::size()] = tile_largest[0];
        largest[c / Vec::size() + 1] = tile_largest[1];
      }
      Vec shift[kVectors], sums[kVectors];
      for (int64_t u = 0; u < width / Vec::size(); ++u) {
        shift[u] = largest[u] * Vec(-base2);
        sums[u] = Vec(0.f);
      }
      for (int64_t j = 0; j < keys; ++j) {
        float* row = scores_t.data() + j * width;
        for (int64_t u = 0; u < width / Vec::size(); ++u) {
          const Vec e = exp2_nonpositive(at::vec::fmadd(Vec::loadu(row + u * Vec::size()), Vec(base2),
                                                        shift[u]));
          e.store(row + u * Vec::size());
          sums[u] = sums[u] + e;
        }
      }
      for (int64_t u = 0; u < width / Vec::size(); ++u)
        (Vec(1.f) / sums[u]).store(inverse.data() + u * Vec::size());
      float* ob = op + (sample * length + first) * out_stride + head * dim;
      int64_t r = 0;
      for (; r + kValueRows <= count; r += kValueRows)
        values_tile<kValueRows, vectors>(scores_t.data() + r, width, vb, v_row, keys,
                                         inverse.data() + r, ob + r * out_stride, out_stride);
      for (; r < count; ++r)
        values_tile<1, vectors>(scores_t.data() + r, width, vb, v_row, keys, inverse.data() + r,
                                ob + r * out_stride, out_stride);
    }
  });
}

// q (N, heads, L, D), k and v (N, heads, keys, D): float32 CPU views whose last dimension is
// contiguous (as the qkv projection's output permuted); out (N, L, heads, D) contiguous; D 1, 2, 4
// or 8 vectors (of 16 floats with AVX-512, 8 with AVX2)
void attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& out) {
  for (const Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 4 &&
                    t->stride(3) == 1,
                "attention takes float32 CPU tensors (N, heads, L, head_dim) whose last dimension is "
                "contiguous");
  const int64_t dim = q.size(3);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == dim &&
                  v.sizes() == k.sizes() && k.size(2) > 0,
              "attention takes keys and values of the queries' batch, heads and head_dim, at least "
              "one key; got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1), dim}),
              "attention writes a contiguous float32 tensor (N, L, heads, head_dim)");
  const int64_t vectors = dim / Vec::size();
  TORCH_CHECK(dim % Vec::size() == 0 && (vectors == 1 || vectors == 2 || vectors == 4 || vectors == 8),
              "attention takes a head_dim of 1, 2, 4 or 8 vectors of ", Vec::size(), " floats, got ", dim);
  const float scale_ = static_cast<float>(scale);
  switch (vectors) {
    case 1: return attend<1>(q, k, v, scale_, out);
    case 2: return attend<2>(q, k, v, scale_, out);
    case 4: return attend<4>(q, k, v, scale_, out);
    default: return attend<8>(q, k, v, scale_, out);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, Tensor(a!) out) -> ()");
  m.impl("attention", c10::DispatchKey::CPU, TORCH_FN(attention));
}
