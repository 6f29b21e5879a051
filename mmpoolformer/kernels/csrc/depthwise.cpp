// The weight gradient of a depthwise k x k convolution (stride 1, zero padding k / 2, dilation 1) over
// channels-last float32 or bfloat16 maps (widened as they are read; the sums in float32 either way),
// built for the CPU at hand by native.py (conv.py's 'compiled' weight gradient).
//
// weight[c, i, j] takes sum over samples and positions (h, w) of grad[c, h, w] * x[c, h + i - k/2,
// w + j - k/2]. A token row holds its channels side by side, so the channels are the vector lanes: for
// a vector of channels, an output row and a filter row i, the k sums of j stay in registers while the
// row's gradient streams past the input row it meets (kStep outputs at a time, each input loaded once).
// Neither map is copied (PyTorch's backward-weights kernel over channels-last maps, and the correlation
// over NCHW copies of both maps, conv.py, take several times as long). The float sums of every
// kRowsInFloat output rows are added to float64 totals; the threads share the channels out, so the
// totals do not depend on how many threads there are.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace {

using mmpoolformer::Vec;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// outputs of a row taken together (AVX-512's 32 vector registers hold their inputs and the sums;
// AVX2's 16 do not)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kStep = 4;
#else
constexpr int kStep = 1;
#endif

// a vector of channels as float32: loaded, or widened from bfloat16 (exactly: its bits shifted up)
inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const at::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
#else
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
#endif
}

// the k filter columns' sums of one output row against one input row, for one vector of channels
// (`lanes` of them: a whole vector, or the tail of the channels): sums[j] += sum over w of g[w] *
// x[w + j - pad], where g and x step by `stride` values from token to token. K: the filter's side,
// known at compile time (0: `k` at run time).
template <int K, typename T>
inline void filter_row(const T* g, const T* x, int64_t width, int64_t stride, int64_t k,
                       int64_t lanes, Vec* sums_out) {
  constexpr int kMax = K > 0 ? K : 1;
  const int64_t side = K > 0 ? K : k, pad = side / 2;
  if (lanes < Vec::size()) {  // (a tail of channels: scalars)
    float lane_sums[Vec::size()];
    for (int64_t j = 0; j < side; ++j) {
      sums_out[j].store(lane_sums);
      for (int64_t lane = 0; lane < lanes; ++lane) {
        for (int64_t w = std::max<int64_t>(0, pad - j); w < std::min(width, width + pad - j); ++w)
          lane_sums[lane] += static_cast<float>(g[w * stride + lane]) *
                             static_cast<float>(x[(w + j - pad) * stride + lane]);
      }
      sums_out[j] = Vec::loadu(lane_sums);
    }
    return;
  }
  if constexpr (K == 0) {  // any side, the sums in memory
    for (int64_t w = 0; w < width; ++w) {
      const Vec gv = load(g + w * stride);
      for (int64_t j = std::max<int64_t>(0, pad - w); j < std::min(side, width + pad - w); ++j)
        sums_out[j] = at::vec::fmadd(gv, load(x + (w + j - pad) * stride), sums_out[j]);
    }
  } else {
    Vec sums[kMax];
    for (int j = 0; j < K; ++j) sums[j] = sums_out[j];
    // the edges, where some of the window lies outside the row, with bounds; the middle without
    const int64_t middle_first = std::min<int64_t>(pad, width);
    const int64_t middle_last = std::max(width - pad, middle_first);
    auto edge = [&](int64_t w) {
      const Vec gv = load(g + w * stride);
      for (int j = 0; j < K; ++j) {
        const int64_t from = w + j - pad;
        if (from >= 0 && from < width) sums[j] = at::vec::fmadd(gv, load(x + from * stride), sums[j]);
      }
    };
    for (int64_t w = 0; w < middle_first; ++w) edge(w);
    int64_t w = middle_first;
    // kStep outputs at a time: their K + kStep - 1 inputs loaded once each (kStep + K - 1 loads and
    // kStep gradient loads for kStep * K multiply-adds, instead of K + 1 loads for K)
    for (; w + kStep <= middle_last; w += kStep) {
      const T* from = x + (w - pad) * stride;
      Vec in[K + kStep - 1];
      for (int t = 0; t < K + kStep - 1; ++t) in[t] = load(from + t * stride);
      for (int u = 0; u < kStep; ++u) {
        const Vec gv = load(g + (w + u) * stride);
        for (int j = 0; j < K; ++j) sums[j] = at::vec::fmadd(gv, in[u + j], sums[j]);
      }
    }
    for (; w < middle_last; ++w) {
      const Vec gv = load(g + w * stride);
      const T* from = x + (w - pad) * stride;
      for (int j = 0; j < K; ++j) sums[j] = at::vec::fmadd(gv, load(from + j * stride), sums[j]);
    }
    for (int64_t w = middle_last; w < width; ++w) edge(w);
    for (int j = 0; j < K; ++j) sums_out[j] = sums[j];
  }
}

constexpr int64_t kRowsInFloat = 8;  // output rows summed in float before float64 takes their sums

template <int K, typename T>
void weight_grad(const T* x, const T* g, float* out, int64_t n, int64_t channels, int64_t height,
                 int64_t width, int64_t k) {
  const int64_t pad = k / 2, blocks = (channels + Vec::size() - 1) / Vec::size(), taps = k * k;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    // per vector of channels, each tap's sums: of the last few rows in float, of all in float64
    std::vector<Vec> sums((last - first) * taps, Vec(0.f));
    std::vector<double> totals((last - first) * taps * Vec::size(), 0.);
    auto flush = [&]() {
      float lanes[Vec::size()];
      for (size_t s = 0; s < sums.size(); ++s) {
        sums[s].store(lanes);
        for (int64_t lane = 0; lane < Vec::size(); ++lane) totals[s * Vec::size() + lane] += lanes[lane];
        sums[s] = Vec(0.f);
      }
    };
    for (int64_t sample = 0; sample < n; ++sample) {
      const T* xs = x + sample * height * width * channels;
      const T* gs = g + sample * height * width * channels;
      for (int64_t h = 0; h < height; ++h) {
        // the thread's channels along the image rows that meet output row h, vector by vector
        for (int64_t block = first; block < last; ++block) {
          const int64_t c0 = block * Vec::size(), lanes = std::min<int64_t>(Vec::size(), channels - c0);
          for (int64_t i = std::max<int64_t>(0, pad - h); i < std::min(k, height + pad - h); ++i)
            filter_row<K, T>(gs + h * width * channels + c0, xs + (h + i - pad) * width * channels + c0,
                             width, channels, k, lanes, sums.data() + (block - first) * taps + i * k);
        }
        if ((h + 1) % kRowsInFloat == 0 || h + 1 == height) flush();
      }
    }
    for (int64_t block = first; block < last; ++block) {
      const int64_t c0 = block * Vec::size(), lanes = std::min<int64_t>(Vec::size(), channels - c0);
      for (int64_t tap = 0; tap < taps; ++tap)
        for (int64_t lane = 0; lane < lanes; ++lane)
          out[(c0 + lane) * taps + tap] =
              static_cast<float>(totals[((block - first) * taps + tap) * Vec::size() + lane]);
    }
  });
}

template <typename T>
void weight_grad_of(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& out, int64_t k) {
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t n = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  switch (k) {
    case 3: return weight_grad<3, T>(xp, gp, op, n, channels, height, width, k);
    case 5: return weight_grad<5, T>(xp, gp, op, n, channels, height, width, k);
    case 7: return weight_grad<7, T>(xp, gp, op, n, channels, height, width, k);
    default: return weight_grad<0, T>(xp, gp, op, n, channels, height, width, k);
  }
}

// out (C, 1, k, k) float32, written: the gradient of a depthwise k x k convolution's weight, from its
// input x and its output's gradient grad, channels-last (N, C, H, W) maps of one shape, both float32
// or both bfloat16 (the sums in float32 all the same)
void depthwise_weight_grad(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& out) {
  const char* name = "depthwise_weight_grad";
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  grad.scalar_type() == x.scalar_type() && x.device().is_cpu() &&
                  grad.device().is_cpu() && x.is_contiguous(kChannelsLast) &&
                  grad.is_contiguous(kChannelsLast),
              name, " takes float32 or bfloat16 CPU maps, both of one dtype, contiguous in ",
              "channels-last");
  TORCH_CHECK(grad.sizes() == x.sizes(), name, " takes tensors of one shape");
  TORCH_CHECK(x.dim() == 4, name, " takes (N, C, H, W) maps, got ", x.dim(), " dimensions");
  const int64_t channels = x.size(1), k = out.size(-1);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 4 &&
                  out.size(0) == channels && out.size(1) == 1 && out.size(2) == k && k % 2 == 1,
              name, " writes a contiguous float32 (C, 1, k, k) weight of the map's ", channels,
              " channels, k odd; got ", out.sizes());
  if (x.scalar_type() == at::kBFloat16) {
    weight_grad_of<at::BFloat16>(x, grad, out, k);
  } else {
    weight_grad_of<float>(x, grad, out, k);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("depthwise_weight_grad(Tensor x, Tensor grad, Tensor(a!) out) -> ()");
  m.impl("depthwise_weight_grad", c10::DispatchKey::CPU, TORCH_FN(depthwise_weight_grad));
}
