// What the compiled kernels share: at::vec's float vector (AVX2 or AVX-512, as native.py builds them),
// the check of the tensors they are given, and how they sum: float vectors over blocks of a few
// hundred values, each block's lanes then in float64, into slots of each thread's own, totalled in
// thread order (the same totals on the same number of threads).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>  // (the bfloat16 conversions)
#include <ATen/cpu/vec/vec.h>

#include <initializer_list>
#include <vector>

namespace mmpoolformer {

using Vec = at::vec::Vectorized<float>;

// float32 CPU tensors, contiguous in `format`, of `like`'s size
inline void check(const at::Tensor& t, const at::Tensor& like, const char* name,
                  at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(format) && t.device().is_cpu(), name,
              " takes contiguous float32 CPU tensors",
              format == at::MemoryFormat::ChannelsLast ? " in channels-last" : "");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " takes tensors of one shape");
}

// bfloat16 CPU tensors, contiguous, of `like`'s size
inline void check_bf16(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " takes contiguous float32 or bfloat16 CPU tensors, all of one dtype");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " takes tensors of one shape");
}

// float32 tensors, or bfloat16 ones, all of one dtype and shape (contiguous CPU tensors); whether
// they are bfloat16
inline bool check_float_or_bf16(std::initializer_list<const at::Tensor*> tensors, const char* name) {
  const at::Tensor& like = **tensors.begin();
  const bool bf16 = like.scalar_type() == at::kBFloat16;
  for (const at::Tensor* t : tensors) {
    if (bf16) {
      check_bf16(*t, like, name);
    } else {
      check(*t, like, name);
    }
  }
  return bf16;
}

// 1 / d to within an ulp or two: the CPU's reciprocal estimate (14 bits with AVX-512, 12 with AVX2)
// and one Newton step, which doubles its bits. A division of vectors issues once in 8-16 cycles:
// GELU's value and derivative divide once per vector. (Not GELU's forward pass: its loop is bound by
// its other operations, and its rational erf must reach exactly -1 for large negative inputs, where
// the estimate left 6e-8 and gelu(-1e4) at -3e-4 instead of 0.)
inline Vec reciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec r(_mm512_rcp14_ps(d));
#else
  const Vec r(_mm256_rcp_ps(d));
#endif
  return r * at::vec::fnmadd(d, r, Vec(2.f));  // r (2 - d r)
}

// the polynomial sum_i coefficients[i] t^i, by Horner's scheme (fused multiply-adds)
template <size_t N>
inline Vec horner(const float (&coefficients)[N], const Vec& t) {
  Vec sum(coefficients[N - 1]);
  for (size_t i = N - 1; i-- > 0;) sum = at::vec::fmadd(sum, t, Vec(coefficients[i]));
  return sum;
}

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

constexpr int64_t kBlock = 64 * Vec::size();  // values summed in float before a double takes them

// the lanes of a vector, summed in float64
inline double lane_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  double sum = 0.;
  for (int64_t lane = 0; lane < Vec::size(); ++lane) sum += lanes[lane];
  return sum;
}

// float64 sums into `slots` slots, each thread of at::parallel_for adding into its own
class ThreadSums {
 public:
  explicit ThreadSums(int64_t slots)
      : slots_(slots), sums_(static_cast<size_t>(at::get_num_threads()) * slots, 0.) {}

  // this thread's slots (inside the parallel region)
  double* mine() { return sums_.data() + at::get_thread_num() * slots_; }

  // every slot's total, the threads' parts added in thread order
  std::vector<double> totals() const {
    std::vector<double> totals(slots_, 0.);
    for (size_t start = 0; start < sums_.size(); start += slots_)
      for (int64_t slot = 0; slot < slots_; ++slot) totals[slot] += sums_[start + slot];
    return totals;
  }

 private:
  int64_t slots_;
  std::vector<double> sums_;
};

}  // namespace mmpoolformer
