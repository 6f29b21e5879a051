// Multi-head attention's forward pass, softmax(q k^T * scale) v, for blocks of queries of one head at a
// time (64 with AVX-512, 32 with AVX2 or where the keys are many), the blocks shared out among the
// threads. Per block: the scores of every key, transposed (a row per key, the block's queries along
// it), with each query's largest score kept as they are made; the exponentials in place, summed per
// query; then the values weighted by them, each output row divided by its sum once. Both products
// keep their tile in registers over the whole head dimension (scores) or over all keys (values), so
// neither loads or stores partial sums, and the transposed scores make every pass a vector one: no
// packing of the keys, which are read where the qkv projection left them (rows of a strided view).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using at::Tensor;
using mmpoolformer::exp2_nonpositive;
using mmpoolformer::Vec;

// A scores tile: kScoreRows keys by kTileVectors vectors of queries in registers, each key's element
// broadcast against the vectors (AVX-512: 6 x 4 of the 32 registers; AVX2: 6 x 2 of the 16). Eight
// keys by two vectors made GCC keep one of the queries' vectors on the stack, reloaded by every
// multiply-add: the scores took 1.6 times as long. A block's queries: one tile (AVX-512) or two
// (AVX2); 32 where there are more than kManyKeys keys, so that the block's transposed scores (keys x
// queries floats) keep within a quarter of a 2 MiB L2 (4200 keys: 0.91 of the time of blocks of 64).
// A values tile: kAccumulators vectors, rows of queries by the head dimension's vectors.
constexpr int kScoreRows = 6;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileVectors = 4, kAccumulators = 16;
constexpr int64_t kQueries = 64;
#else
constexpr int kTileVectors = 2, kAccumulators = 12;
constexpr int64_t kQueries = 32;
#endif
constexpr int64_t kFewerQueries = 32, kManyKeys = 2048;
constexpr int64_t kMaxVectors = kQueries / Vec::size();  // a block's vectors of queries: 4
// the values pass asks for the value row this many keys ahead: the rows lie a projection's width
// apart (3 x 320 floats in CAFormer's stage 2), too far for the CPU's own prefetchers
constexpr int64_t kAhead = 16;
// sums over the keys (the weights' and the weighted values') in chunks of this many, each from zero,
// then added together: a float's rounding grows with the number of terms summed one after another
// (2100 keys: 3.3 times PyTorch's error in one run of sums, as close as its in chunks)
constexpr int64_t kKeyChunk = 256;

// scores[r, :tile vectors] = keys[r] . queries_t[:, :tile vectors] for `rows` keys, each column's
// largest value into `largest`
template <int rows, int tile>
inline void scores_tile(const float* keys, int64_t key_stride, const float* queries_t, int64_t width,
                        int64_t dim, float* scores, Vec* largest) {
  Vec acc[rows][tile];
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < tile; ++u) acc[r][u] = Vec(0.f);
  for (int64_t e = 0; e < dim; ++e) {
    Vec b[tile];
    for (int u = 0; u < tile; ++u) b[u] = Vec::loadu(queries_t + e * width + u * Vec::size());
    for (int r = 0; r < rows; ++r) {
      const Vec a(keys[r * key_stride + e]);
      for (int u = 0; u < tile; ++u) acc[r][u] = at::vec::fmadd(a, b[u], acc[r][u]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < tile; ++u) {
      acc[r][u].store(scores + r * width + u * Vec::size());
      largest[u] = at::vec::maximum(largest[u], acc[r][u]);
    }
}

// the scores of every key for `tile` vectors of queries (a column of the transposed scores), and
// their largest
template <int tile>
inline void scores_columns(const float* keys, int64_t key_stride, int64_t count, const float* queries_t,
                           int64_t width, int64_t dim, float* scores_t, Vec* largest) {
  for (int u = 0; u < tile; ++u) largest[u] = Vec(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kScoreRows <= count; j += kScoreRows)
    scores_tile<kScoreRows, tile>(keys + j * key_stride, key_stride, queries_t, width, dim,
                                  scores_t + j * width, largest);
  for (; j < count; ++j)
    scores_tile<1, tile>(keys + j * key_stride, key_stride, queries_t, width, dim, scores_t + j * width,
                         largest);
}

// the transposed scores' exponentials in place, each less its query's largest (in base 2), and each
// query's inverse sum of them (in chunks of keys), for `vectors` vectors of queries (the sums kept in
// registers: as an array indexed at run time they went through memory, a store and a load a key)
template <int vectors>
inline void softmax_columns(float* scores_t, int64_t width, int64_t keys, const Vec* largest, float base2,
                            float* inverse) {
  Vec shift[vectors], sums[vectors];
  for (int u = 0; u < vectors; ++u) {
    shift[u] = largest[u] * Vec(-base2);
    sums[u] = Vec(0.f);
  }
  const Vec scale(base2);
  for (int64_t start = 0; start < keys; start += kKeyChunk) {
    Vec chunk[vectors];
    for (int u = 0; u < vectors; ++u) chunk[u] = Vec(0.f);
    for (int64_t j = start; j < std::min(keys, start + kKeyChunk); ++j) {
      float* row = scores_t + j * width;
      for (int u = 0; u < vectors; ++u) {
        const Vec e = exp2_nonpositive(at::vec::fmadd(Vec::loadu(row + u * Vec::size()), scale, shift[u]));
        e.store(row + u * Vec::size());
        chunk[u] = chunk[u] + e;
      }
    }
    for (int u = 0; u < vectors; ++u) sums[u] = sums[u] + chunk[u];
  }
  for (int u = 0; u < vectors; ++u) (Vec(1.f) / sums[u]).store(inverse + u * Vec::size());
}

// out[r, :] = sum over keys j of weights_t[j, r] values[j, :], times inverse[r], for `rows` queries;
// the head dimension `vectors` vectors. Summed in chunks of kKeyChunk keys, each chunk's sums from
// zero in registers, then added to the totals
template <int rows, int vectors>
inline void values_tile(const float* weights_t, int64_t width, const float* values, int64_t value_stride,
                        int64_t keys, const float* inverse, float* out, int64_t out_stride) {
  Vec total[rows][vectors], acc[rows][vectors];
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < vectors; ++u) total[r][u] = Vec(0.f);
  const auto add_key = [&](int64_t j) {
    Vec b[vectors];
    for (int u = 0; u < vectors; ++u) b[u] = Vec::loadu(values + j * value_stride + u * Vec::size());
    for (int r = 0; r < rows; ++r) {
      const Vec a(weights_t[j * width + r]);
      for (int u = 0; u < vectors; ++u) acc[r][u] = at::vec::fmadd(a, b[u], acc[r][u]);
    }
  };
  for (int64_t start = 0; start < keys; start += kKeyChunk) {
    const int64_t stop = std::min(keys, start + kKeyChunk);
    for (int r = 0; r < rows; ++r)
      for (int u = 0; u < vectors; ++u) acc[r][u] = Vec(0.f);
    // (a loop of its own for the keys with a row to ask for: a condition inside the one loop took
    // 15% more time with AVX2)
    int64_t j = start;
    for (; j < std::min(stop, keys - kAhead); ++j) {
      for (int u = 0; u < vectors; u += 64 / sizeof(Vec))  // (a cache line of 64 bytes at a time)
        __builtin_prefetch(values + (j + kAhead) * value_stride + u * Vec::size());
      add_key(j);
    }
    for (; j < stop; ++j) add_key(j);
    for (int r = 0; r < rows; ++r)
      for (int u = 0; u < vectors; ++u) total[r][u] = total[r][u] + acc[r][u];
  }
  for (int r = 0; r < rows; ++r)
    for (int u = 0; u < vectors; ++u)
      (total[r][u] * Vec(inverse[r])).store(out + r * out_stride + u * Vec::size());
}

template <int vectors>
void attend(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out) {
  constexpr int kValueRows = std::max(1, kAccumulators / vectors);
  const int64_t n = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3),
                keys = k.size(2);
  const int64_t block = keys > kManyKeys ? kFewerQueries : kQueries;
  const int64_t blocks = (length + block - 1) / block;
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
    std::vector<float> scores_t(keys * block), queries_t(dim * block), inverse(block);
    std::vector<float> packed(pack ? 2 * keys * dim : 0);
    int64_t packed_head = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / blocks / heads, head = task / blocks % heads;
      const int64_t first = task % blocks * block, count = std::min(block, length - first);
      const int64_t width = (count + Vec::size() - 1) / Vec::size() * Vec::size();  // padded
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
      // the scores in columns of whole tiles, then of two vectors and of one for what is left
      Vec largest[kMaxVectors];
      int64_t c = 0;
      for (; c + kTileVectors * Vec::size() <= width; c += kTileVectors * Vec::size())
        scores_columns<kTileVectors>(kb, k_row, keys, queries_t.data() + c, width, dim,
                                     scores_t.data() + c, largest + c / Vec::size());
      if (kTileVectors > 2 && c + 2 * Vec::size() <= width) {
        scores_columns<2>(kb, k_row, keys, queries_t.data() + c, width, dim, scores_t.data() + c,
                          largest + c / Vec::size());
        c += 2 * Vec::size();
      }
      for (; c < width; c += Vec::size())
        scores_columns<1>(kb, k_row, keys, queries_t.data() + c, width, dim, scores_t.data() + c,
                          largest + c / Vec::size());
      switch (width / Vec::size()) {
        case 1: softmax_columns<1>(scores_t.data(), width, keys, largest, base2, inverse.data()); break;
        case 2: softmax_columns<2>(scores_t.data(), width, keys, largest, base2, inverse.data()); break;
        case 3: softmax_columns<3>(scores_t.data(), width, keys, largest, base2, inverse.data()); break;
        default: softmax_columns<4>(scores_t.data(), width, keys, largest, base2, inverse.data());
      }
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
