// Multi-head attention's backward pass in bf16, for one head at a time, its queries in blocks: the
// five products on oneDNN's batch-reduce GEMM micro-kernel (PyTorch's `cpublas::brgemm`: AMX tiles
// where the CPU has them, avx512_bf16 dot products elsewhere), and everything between them in one
// pass per pair of query rows. Per block, the scores s = q k^T and dp = do v^T, each a block of rows
// over all keys (fp32); then per query row the softmax p = exp(scale s - max) / sum (recomputed from
// whole rows, so no log-sum-exp is kept from the forward pass) and ds = scale p (dp - sum_j p dp),
// rounded to bf16 as the next products take them. Then dv^T += do^T p and dk^T += q^T ds (summed
// over the blocks in fp32), and dq = ds k for the block.
//
// The micro-kernel takes its right-hand factor in VNNI order, pairs of rows interleaved ([K/2][N][2]),
// so the pass writes p and ds straight in that order, two query rows at a time (ds also in rows, for
// dq); k^T and v^T (the scores' right-hand factors) and k (dq's) are laid out so once per task.
//
// PyTorch's flash attention for CPUs computes its backward in fp32 tiles; under bf16 autocast it took
// as long as in fp32 (26-31 ms at CAFormer-S18's stage 2: 2x10 heads of 1024 tokens of 32; this
// kernel 15-18 ms on the Xeon of 2026-12-05, with AMX). The tasks shared out among the threads are
// the heads, or where there are fewer than 4 heads a thread runs of each head's blocks, whose sums of
// dk and dv are then added up.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using at::Tensor;
using bf16 = at::BFloat16;

#if defined(CPU_CAPABILITY_AVX512)
using mmpoolformer::exp2_nonpositive;
using mmpoolformer::Vec;
namespace cpublas = at::native::cpublas;

// query rows per block: the block's scores and their gradient (2 x rows x keys floats) stay in a 2 MiB
// L2 with the rest up to 2048 keys
constexpr int64_t kQueries = 64, kFewerQueries = 32, kManyKeys = 2048;
constexpr int64_t kTasksPerThread = 4;

// a mask of the first `count` lanes (at most 16)
inline __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }

// the order that turns 32 bf16 [a 0..15, b 0..15] into pairs (a j, b j): VNNI order
inline __m512i pair_order() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                          5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

// Rows i and i + 1 of a block (`second`: whether row i + 1 is a query, not padding to an even count):
// the softmax of the scores (in place, as exponentials, then scaled into p) and ds. Written as bf16:
// p and ds in VNNI pairs of the two rows ([i/2][key][2]), ds also as two rows. Compiled for
// avx512_bf16 (its instruction rounds two vectors to bf16 at once); called only where the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx512bf16")
void softmax_backward_rows(float* scores, const float* grad, int64_t keys, bool second, float scale,
                           bf16* p_pairs, bf16* ds_pairs, bf16* ds_rows, int64_t ds_stride) {
  const float base2 = scale * 1.4426950408889634f;  // to powers of 2: scale * log2(e)
  const float inf = std::numeric_limits<float>::infinity();
  float inverse[2] = {0.f, 0.f}, centre[2] = {0.f, 0.f};
  for (int r = 0; r < (second ? 2 : 1); ++r) {
    float* s = scores + r * keys;
    const float* g = grad + r * keys;
    __m512 largest = _mm512_set1_ps(-inf);
    for (int64_t j = 0; j < keys; j += 16)
      largest = _mm512_max_ps(
          largest, _mm512_mask_loadu_ps(_mm512_set1_ps(-inf), first(std::min<int64_t>(16, keys - j)), s + j));
    const Vec shift(-_mm512_reduce_max_ps(largest) * base2);
    __m512 sum = _mm512_setzero_ps(), dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j += 16) {
      const __mmask16 m = first(std::min<int64_t>(16, keys - j));
      const __m512 e = exp2_nonpositive(at::vec::fmadd(
          Vec(_mm512_mask_loadu_ps(_mm512_set1_ps(-inf), m, s + j)), Vec(base2), shift));
      _mm512_mask_storeu_ps(s + j, m, e);
      sum = _mm512_add_ps(sum, e);
      dot = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(m, g + j), dot);
    }
    inverse[r] = 1.f / _mm512_reduce_add_ps(sum);
    centre[r] = _mm512_reduce_add_ps(dot) * inverse[r];  // sum_j p dp
  }
  const __m512i pairs = pair_order();
  const __m512 inverse0 = _mm512_set1_ps(inverse[0]), inverse1 = _mm512_set1_ps(inverse[1]);
  const __m512 centre0 = _mm512_set1_ps(centre[0]), centre1 = _mm512_set1_ps(centre[1]);
  const __m512 scale_ = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < keys; j += 16) {
    const int64_t count = std::min<int64_t>(16, keys - j);
    const __mmask16 m = first(count);
    const __mmask16 m1 = second ? m : 0;  // (row i + 1 padding: zeros)
    const __m512 p0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scores + j), inverse0);
    const __m512 p1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, scores + keys + j), inverse1);
    const __m512 dp0 = _mm512_maskz_loadu_ps(m, grad + j), dp1 = _mm512_maskz_loadu_ps(m1, grad + keys + j);
    const __m512 ds0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(dp0, centre0)), scale_);
    const __m512 ds1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(dp1, centre1)), scale_);
    const __m512i p = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0));  // [p0 row, p1 row]
    const __m512i ds = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ds1, ds0));
    const __mmask32 both = static_cast<__mmask32>((uint64_t{1} << (2 * count)) - 1);
    _mm512_mask_storeu_epi16(p_pairs + 2 * j, both, _mm512_permutexvar_epi16(pairs, p));
    _mm512_mask_storeu_epi16(ds_pairs + 2 * j, both, _mm512_permutexvar_epi16(pairs, ds));
    _mm256_mask_storeu_epi16(ds_rows + j, m, _mm512_castsi512_si256(ds));
    if (second) _mm256_mask_storeu_epi16(ds_rows + ds_stride + j, m, _mm512_extracti64x4_epi64(ds, 1));
  }
}
#pragma GCC pop_options

// A head's rows (count x dim bf16, `stride` apart) laid out for the micro-kernel, 16 rows at a time
// (32-bit words of pairs of columns gathered from 16 rows)
inline __m512i row_offsets(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// k^T in VNNI order: out[e/2][j][2] = rows[j][e], rows[j][e + 1]
void transposed_pairs(const bf16* rows, int64_t stride, int64_t count, int64_t dim, bf16* out) {
  const __m512i offsets = row_offsets(stride);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = first(std::min<int64_t>(16, count - j));
    for (int64_t e = 0; e < dim; e += 2)
      _mm512_mask_storeu_epi32(out + e * count + 2 * j, m, _mm512_mask_i32gather_epi32(
          _mm512_setzero_si512(), m, offsets, rows + j * stride + e, 2));
  }
}

// k in VNNI order: out[j/2][e][2] = rows[j][e], rows[j + 1][e] (a zero row after an odd count)
void paired_rows(const bf16* rows, int64_t stride, int64_t count, int64_t dim, bf16* out) {
  for (int64_t j = 0; j < count; j += 2)
    for (int64_t e = 0; e < dim; e += 16) {
      const __mmask16 m = first(std::min<int64_t>(16, dim - e));
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, rows + j * stride + e));
      const __m512i b = j + 1 < count
          ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, rows + (j + 1) * stride + e))
          : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(out + (j / 2 * dim + e) * 2, m, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

// q^T: out[e][i] = rows[i][e], `width` columns (zeros after `count`)
void transposed(const bf16* rows, int64_t stride, int64_t count, int64_t dim, int64_t width, bf16* out) {
  const __m512i offsets = row_offsets(stride);
  for (int64_t i = 0; i < width; i += 16) {
    const __mmask16 m = first(std::max<int64_t>(0, std::min<int64_t>(16, count - i)));
    const __mmask16 w = first(std::min<int64_t>(16, width - i));
    for (int64_t e = 0; e < dim; e += 2) {
      const __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, offsets,
                                                        rows + i * stride + e, 2);
      _mm256_mask_storeu_epi16(out + e * width + i, w, _mm512_cvtepi32_epi16(pairs));
      _mm256_mask_storeu_epi16(out + (e + 1) * width + i, w,
                               _mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)));
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512bf16")
// rows of floats (count x dim, dense) rounded into bf16 rows `stride` apart
void rounded_rows(const float* in, int64_t count, int64_t dim, bf16* out, int64_t stride) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t e = 0; e < dim; e += 16) {
      const __mmask16 m = first(std::min<int64_t>(16, dim - e));
      _mm256_mask_storeu_epi16(out + i * stride + e, m, reinterpret_cast<__m256i>(
          _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, in + i * dim + e))));
    }
}

// the transpose of dim x count floats (dense) rounded into bf16 rows `stride` apart: out[j][e] = in[e][j]
// (pairs of columns scattered as 32-bit words to 16 rows at a time)
void rounded_transpose(const float* in, int64_t count, int64_t dim, bf16* out, int64_t stride) {
  const __m512i offsets = row_offsets(stride);
  const __m512i pairs = pair_order();
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = first(std::min<int64_t>(16, count - j));
    for (int64_t e = 0; e < dim; e += 2) {
      const __m512i both = reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m, in + (e + 1) * count + j),
                              _mm512_maskz_loadu_ps(m, in + e * count + j)));
      _mm512_mask_i32scatter_epi32(out + j * stride + e, m, offsets,
                                   _mm512_permutexvar_epi16(pairs, both), 2);
    }
  }
}
#pragma GCC pop_options

void attention_backward_heads(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out,
                              float scale, const Tensor& grad_q, const Tensor& grad_k,
                              const Tensor& grad_v) {
  const int64_t n = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3),
                keys = k.size(2);
  const int64_t block = keys > kManyKeys ? kFewerQueries : kQueries;
  const int64_t blocks = (length + block - 1) / block, even_keys = (keys + 1) / 2 * 2;
  // Each head's blocks in `splits` runs of consecutive blocks, so that there are about 4 tasks or more
  // per thread (with fewer, threads wait at the end: one head on 2 threads took 1.6 ms as one task,
  // 0.83-1.03 as runs); a run sums its own dk^T and dv^T, added up per head afterwards in the runs'
  // order
  const int64_t splits =
      std::min(blocks, (kTasksPerThread * at::get_num_threads() + n * heads - 1) / (n * heads));
  std::vector<float> partial(splits > 1 ? n * heads * splits * 2 * dim * keys : 0);
  // where a head's rows start in `t`: head_task = sample * heads + head
  const auto head_of = [heads](const Tensor& t, int64_t head_task) {
    return head_task / heads * t.stride(0) + head_task % heads * t.stride(1);
  };
  // dk^T and dv^T of a head (dim x keys floats each, one after the other) rounded into dk and dv
  const auto write_key_grads = [&](const float* sums, int64_t head_task) {
    rounded_transpose(sums, keys, dim, grad_k.data_ptr<bf16>() + head_of(grad_k, head_task),
                      grad_k.stride(2));
    rounded_transpose(sums + dim * keys, keys, dim, grad_v.data_ptr<bf16>() + head_of(grad_v, head_task),
                      grad_v.stride(2));
  };
  at::parallel_for(0, n * heads * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t most_rows = (blocks + splits - 1) / splits * block + 1;
    // a head's factors laid out: k^T and v^T in pairs, k in pairs, q^T and do^T (the run's rows)
    std::vector<bf16> k_t(dim * keys), v_t(dim * keys), k_pairs(even_keys * dim), q_t(dim * most_rows),
        do_t(dim * most_rows);
    // a block's: scores and dp (fp32), p and ds in pairs, ds in rows (a zero column after odd keys)
    std::vector<float> scores(block * keys), grad_scores(block * keys), grad_q_block(block * dim);
    std::vector<bf16> p_pairs(block * keys), ds_pairs(block * keys), ds_rows(block * even_keys, bf16(0.f));
    std::vector<float> sums(splits > 1 ? 0 : 2 * dim * keys);  // dk^T, dv^T summed over blocks
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head_task = task / splits, split = task % splits;
      const int64_t row0 = split * blocks / splits * block,
                    row1 = std::min(length, (split + 1) * blocks / splits * block);
      const int64_t width = (row1 - row0 + 1) / 2 * 2;  // (even: the pairs' inner dimension)
      float* grad_k_t = splits > 1 ? partial.data() + task * 2 * dim * keys : sums.data();
      float* grad_v_t = grad_k_t + dim * keys;
      const bf16 *qh = q.const_data_ptr<bf16>() + head_of(q, head_task),
                 *kh = k.const_data_ptr<bf16>() + head_of(k, head_task),
                 *vh = v.const_data_ptr<bf16>() + head_of(v, head_task),
                 *doh = grad_out.const_data_ptr<bf16>() + head_of(grad_out, head_task);
      const int64_t q_row = q.stride(2), do_row = grad_out.stride(2);
      // (each run lays out its head's keys and values itself: runs of one head are separate tasks)
      transposed_pairs(kh, k.stride(2), keys, dim, k_t.data());
      transposed_pairs(vh, v.stride(2), keys, dim, v_t.data());
      paired_rows(kh, k.stride(2), keys, dim, k_pairs.data());
      transposed(qh + row0 * q_row, q_row, row1 - row0, dim, width, q_t.data());
      transposed(doh + row0 * do_row, do_row, row1 - row0, dim, width, do_t.data());
      for (int64_t first = row0; first < row1; first += block) {
        const int64_t count = std::min(block, row1 - first), even_count = (count + 1) / 2 * 2;
        // s = q k^T, dp = do v^T for the block's rows
        cpublas::brgemm(count, keys, dim, q_row, keys, keys, false, qh + first * q_row, k_t.data(),
                        scores.data(), true);
        cpublas::brgemm(count, keys, dim, do_row, keys, keys, false, doh + first * do_row, v_t.data(),
                        grad_scores.data(), true);
        for (int64_t i = 0; i < count; i += 2)
          softmax_backward_rows(scores.data() + i * keys, grad_scores.data() + i * keys, keys,
                                i + 1 < count, scale, p_pairs.data() + i * keys,
                                ds_pairs.data() + i * keys, ds_rows.data() + i * even_keys, even_keys);
        // dv^T += do^T p, dk^T += q^T ds (the block's rows: the products' inner dimension)
        cpublas::brgemm(dim, keys, even_count, width, keys, keys, first > row0, do_t.data() + first - row0,
                        p_pairs.data(), grad_v_t, true);
        cpublas::brgemm(dim, keys, even_count, width, keys, keys, first > row0, q_t.data() + first - row0,
                        ds_pairs.data(), grad_k_t, true);
        // dq = ds k
        cpublas::brgemm(count, dim, even_keys, even_keys, dim, dim, false, ds_rows.data(),
                        k_pairs.data(), grad_q_block.data(), true);
        rounded_rows(grad_q_block.data(), count, dim,
                     grad_q.data_ptr<bf16>() + head_of(grad_q, head_task) + first * grad_q.stride(2),
                     grad_q.stride(2));
      }
      if (splits == 1) write_key_grads(grad_k_t, head_task);
    }
    cpublas::brgemm_release(true);  // (the AMX tiles' configuration, where it set one)
  });
  if (splits == 1) return;
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head_task = begin; head_task < end; ++head_task) {
      float* total = partial.data() + head_task * splits * 2 * dim * keys;
      for (int64_t split = 1; split < splits; ++split) {
        const float* part = total + split * 2 * dim * keys;
        for (int64_t i = 0; i < 2 * dim * keys; ++i) total[i] += part[i];
      }
      write_key_grads(total, head_task);
    }
  });
}
#endif

// whether this build and CPU run the kernel: AVX-512 with avx512_bf16, and oneDNN enabled (the
// micro-kernel is oneDNN's; the caller checks the results once, since oneDNN may be limited to less)
bool attention_backward_available() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// q, grad_out (N, heads, L, D), k, v (N, heads, keys, D): bf16 CPU views whose last dimension is
// contiguous; grad_q, grad_k, grad_v of their shapes, written (last dimension contiguous); D even
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out,
                        double scale, const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v) {
  for (const Tensor* t : {&q, &k, &v, &grad_out, &grad_q, &grad_k, &grad_v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->dim() == 4 &&
                    t->stride(3) == 1,
                "attention_backward takes bfloat16 CPU tensors (N, heads, L, head_dim) whose last "
                "dimension is contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
                  v.sizes() == k.sizes() && k.size(2) > 0 && q.size(3) % 2 == 0 &&
                  grad_out.sizes() == q.sizes() && grad_q.sizes() == q.sizes() &&
                  grad_k.sizes() == k.sizes() && grad_v.sizes() == k.sizes(),
              "attention_backward takes keys and values of the queries' batch, heads and (even) "
              "head_dim, at least one key, gradients of the tensors' shapes; got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(attention_backward_available(),
              "attention_backward needs AVX-512 with avx512_bf16 and oneDNN enabled");
  if (q.numel() == 0) {  // (no samples, heads or queries: nothing flows to the keys and values)
    grad_k.zero_();
    grad_v.zero_();
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  attention_backward_heads(q, k, v, grad_out, static_cast<float>(scale), grad_q, grad_k, grad_v);
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("attention_backward_available() -> bool", &attention_backward_available);
  m.def("attention_backward(Tensor q, Tensor k, Tensor v, Tensor grad_out, float scale, "
        "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
  m.impl("attention_backward", c10::DispatchKey::CPU, TORCH_FN(attention_backward));
}
