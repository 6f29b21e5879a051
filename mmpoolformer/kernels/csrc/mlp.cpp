// The MLP kernel's chunk loop (mlp.py) with the chunks shared out among the threads, for blocks with
// GroupNorm or channel LayerNorm and GELU or StarReLU (PoolFormer's, the MetaFormer Baselines'), and
// for its first half alone (SepConv's expansion), built for the CPU at hand by native.py.
//
// mlp.py runs its chunks one after another and each operation of a chunk on every thread: a product,
// the activation, a bias sum, each with its own start and end of the threads, and Python between them.
// On two cores the second thread then waits at each end for the first (the main thread also runs
// Python; 17% of the second thread's time in a profiled S12 training step) and both threads' halves
// of a chunk share the caches. Here each thread takes its own chunks whole, from the normalisation
// to the output (and back, in backward), with single-threaded products, so the threads meet once per
// call: the weight gradients accumulate in each thread's own tensors, added in thread order at the
// end (the same sums on the same number of threads). The operations are ATen's (MKL's products) and
// the activations' passes of activations.cpp, called through the dispatcher, as in mlp.py's chunks.
//
// Rows are (N * H * W, C) channels-last tokens; a and b the norm's (below); w2 and b2 have the
// LayerScale folded in, b2 in the rows' dtype (it joins the residual's pass: in the product it costs
// a pass of its own, and under bf16 autocast a rounding); scale is the branch's factor (stochastic
// depth's, equal for all samples); res_scale ResScale's (C,) factor on the residual, or none. The
// products run in the weights' dtype: the rows' (float32, float64), or bfloat16 under bf16
// autocast, when the normalised rows, the hidden map and the gradients the products take are
// bfloat16 and the sums they feed (the output, the weights' gradients) stay in the rows' precision,
// as in mlp.py.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <vector>

#include "common.h"
#include "layer_norm.h"

namespace {

using at::Tensor;
using mmpoolformer::Vec;
using BVec = at::vec::Vectorized<at::BFloat16>;

// What one thread needs for its chunks: buffers of the chunk length, reused chunk after chunk, all in
// the products' dtype (`channels_low`: C-wide results of bfloat16 products, before they are added
// to the rows' precision); the gradients' for backward only
struct Buffers {
  Tensor normed, hidden, act, channels_low, grad_hidden, grad;
  Buffers(int64_t rows, int64_t channels, int64_t hidden_size, const at::TensorOptions& options,
          bool backward)
      : normed(at::empty({rows, channels}, options)), hidden(at::empty({rows, hidden_size}, options)),
        act(at::empty({rows, hidden_size}, options)),
        channels_low(at::empty({rows, channels}, options)) {
    if (backward) {
      grad_hidden = at::empty({rows, hidden_size}, options);
      grad = at::empty({rows, channels}, options);
    }
  }
};

// chunk c of `count` over `total` rows: [first, first + length)
struct Chunks {
  int64_t total, count, length;
  Chunks(int64_t total, int64_t rows) : total(total) {
    // a multiple of the threads, so that each takes as many chunks
    const int64_t threads = at::get_num_threads();
    count = (total + rows - 1) / rows;
    count = (count + threads - 1) / threads * threads;
    length = (total + count - 1) / count;
    count = (total + length - 1) / length;
  }
  int64_t first(int64_t c) const { return c * length; }
  int64_t size(int64_t c) const { return std::min(length, total - c * length); }
};

// The block's norm as the chunks apply it (mlp.py's GroupNormRows and LayerNormRows): GroupNorm's
// per-sample affine map a * x + b, a and b of shape (N, C) (its statistics are each whole sample's,
// computed before); or channel LayerNorm with weight a and bias b of shape (C, ) or none, over each
// row, whose statistics each chunk computes (again in backward).
struct Norm {
  std::optional<Tensor> a, b;
  bool per_row;
  double eps;
  int64_t per_sample;

  // whether layer_norm.h's loops take these rows (float32, as the weight and bias or GroupNorm's
  // per-sample coefficients; `bf16_rows`: bfloat16 rows too, as LayerNorm's forward takes them),
  // else ATen's
  bool compiled(const Tensor& rows, bool bf16_rows = false) const {
    const bool takes = rows.scalar_type() == at::kFloat ||
                       (bf16_rows && rows.scalar_type() == at::kBFloat16);
    return takes && rows.is_contiguous() &&
           (!a.has_value() || (a->scalar_type() == at::kFloat && a->is_contiguous())) &&
           (!b.has_value() || (b->scalar_type() == at::kFloat && b->is_contiguous()));
  }
  static const float* pointer(const std::optional<Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;
  }

  // rows [first, first + k) of x normalised into `out`; a per-row norm's (mean, rstd) of them
  std::tuple<Tensor, Tensor> apply(const Tensor& x, int64_t first, int64_t k, Tensor& out) const {
    if (per_row) {
      const Tensor rows = x.narrow(0, first, k);
      const bool into = out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16;
      if (compiled(rows, true) && into) {  // (layer_norm.h: straight into the products' dtype)
        const auto stats = rows.options().dtype(at::kFloat);
        Tensor mean = at::empty({k}, stats), rstd = at::empty({k}, stats);
        mmpoolformer::with_values(rows, [&](const auto* values) {
          mmpoolformer::layer_norm_rows_into(values, k, rows.size(1), pointer(a), pointer(b), eps, out,
                                             0, mean.data_ptr<float>(), rstd.data_ptr<float>());
        });
        return {mean, rstd};
      }
      auto [normed, mean, rstd] = at::native_layer_norm(rows, {rows.size(1)}, a, b, eps);
      out.copy_(normed);  // (in the products' dtype: normalised in the rows', then rounded)
      return {mean, rstd};
    }
    const bool into = out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16;
    for (int64_t start = first; start < first + k;) {
      const int64_t sample = start / per_sample;
      const int64_t end = std::min(first + k, (sample + 1) * per_sample);
      const Tensor rows = x.narrow(0, start, end - start);
      if (compiled(rows) && into) {  // (layer_norm.h: straight into the products' dtype)
        const int64_t width = rows.size(1);
        mmpoolformer::affine_rows_into(rows.const_data_ptr<float>(), end - start, width,
                                       pointer(a) + sample * width, pointer(b) + sample * width, out,
                                       start - first);
      } else {
        Tensor part = out.narrow(0, start - first, end - start);
        at::addcmul_out(part, (*b)[sample], rows, (*a)[sample]);
      }
      start = end;
    }
    return {};
  }

  // a per-row norm's backward over rows [first, first + k): their gradient from the normalised
  // rows' one, into `grad_rows`; its weight's and bias's added into `grad_weight` / `grad_bias`
  // (written there where `fresh`)
  void backward_rows(const Tensor& grad_normed, const Tensor& x, int64_t first, int64_t k,
                     const std::tuple<Tensor, Tensor>& stats, const Tensor& grad_rows,
                     Tensor& grad_weight, Tensor& grad_bias, bool fresh) const {
    const Tensor rows = x.narrow(0, first, k);
    if (compiled(rows)) {  // (the chunk's weight and bias sums, then added to the thread's)
      const int64_t width = rows.size(1);
      std::vector<float> sums(2 * width, 0.f);
      mmpoolformer::layer_norm_rows_backward(
          grad_normed.const_data_ptr<float>(), rows.const_data_ptr<float>(),
          std::get<0>(stats).const_data_ptr<float>(), std::get<1>(stats).const_data_ptr<float>(),
          pointer(a), k, width, grad_rows.narrow(0, first, k).data_ptr<float>(),
          grad_weight.defined() ? sums.data() : nullptr,
          grad_bias.defined() ? sums.data() + width : nullptr);
      Tensor* totals[] = {&grad_weight, &grad_bias};
      for (int64_t i = 0; i < 2; ++i) {
        if (!totals[i]->defined()) continue;
        const Tensor part = at::from_blob(sums.data() + i * width, {width}, rows.options());
        fresh ? totals[i]->copy_(part) : totals[i]->add_(part);
      }
      return;
    }
    auto [grad_x, part_weight, part_bias] = at::native_layer_norm_backward(
        grad_normed, rows, {rows.size(1)}, std::get<0>(stats), std::get<1>(stats), a, b,
        {true, grad_weight.defined(), grad_bias.defined()});
    grad_rows.narrow(0, first, k).copy_(grad_x);
    if (grad_weight.defined()) fresh ? grad_weight.copy_(part_weight) : grad_weight.add_(part_weight);
    if (grad_bias.defined()) fresh ? grad_bias.copy_(part_bias) : grad_bias.add_(part_bias);
  }
};

void check_rows(const Tensor& t, const Tensor& rows, int64_t width, at::ScalarType dtype,
                const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows.size(0) &&
                  t.size(1) == width && t.scalar_type() == dtype,
              name, " takes contiguous CPU rows (", rows.size(0), ", ", width, ") of ", dtype,
              ", got ", t.sizes(), " ", t.scalar_type());
}

// An op's arguments: `maps`, rows of x's shape and dtype, and the kept hidden map
// where given, rows of fc1's width in the products' (w1's) dtype, or bfloat16 with float32 products
// (under bf16 autocast: mlp.py's kept_hidden_dtype)
void check_arguments(const Tensor& x, std::initializer_list<const Tensor*> maps,
                     const std::optional<Tensor>& hidden, const Tensor& w1, const char* name) {
  for (const Tensor* map : maps) check_rows(*map, x, x.size(1), x.scalar_type(), name);
  if (!hidden.has_value()) return;
  const bool rounded = hidden->scalar_type() == at::kBFloat16 && w1.scalar_type() == at::kFloat;
  check_rows(*hidden, x, w1.size(0), rounded ? at::kBFloat16 : w1.scalar_type(), name);
}

// whether the kept hidden map is in another dtype than the products (check_arguments): each chunk's
// is then computed in a buffer and rounded into it (forward), widened into the buffer (backward)
bool kept_apart(const std::optional<Tensor>& hidden, const Tensor& w1) {
  return hidden.has_value() && hidden->scalar_type() != w1.scalar_type();
}

// out = input @ weight_t (+ bias)
void product_out(Tensor& out, const Tensor& input, const Tensor& weight_t,
                const std::optional<Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, input, weight_t);
  } else {
    at::mm_out(out, input, weight_t);
  }
}

// total += widened(part): a float32 total, a bfloat16 part of as many values, both contiguous
void add_widened(Tensor& total, const Tensor& part) {
  float* tp = total.data_ptr<float>();
  const at::BFloat16* pp = part.const_data_ptr<at::BFloat16>();
  const int64_t n = total.numel();
  int64_t i = 0;
  for (; i + BVec::size() <= n; i += BVec::size()) {
    const auto [low, high] = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(pp + i));
    (Vec::loadu(tp + i) + low).store(tp + i);
    (Vec::loadu(tp + i + Vec::size()) + high).store(tp + i + Vec::size());
  }
  for (; i < n; ++i) tp[i] += static_cast<float>(pp[i]);
}

// total += a @ b (total = a @ b where `fresh`), in total's precision. A product of bfloat16 chunks is
// written in bfloat16 (as PyTorch's bf16 products are) into `scratch` (allocated on first use, reused
// chunk after chunk), then widened and added in one pass.
void accumulate(Tensor& total, const Tensor& a, const Tensor& b, Tensor& scratch, bool fresh) {
  if (total.scalar_type() == a.scalar_type()) {
    fresh ? at::mm_out(total, a, b) : total.addmm_(a, b);
    return;
  }
  if (!scratch.defined()) scratch = at::empty(total.sizes(), a.options());
  at::mm_out(scratch, a, b);
  if (fresh) {
    total.copy_(scratch);
  } else {
    add_widened(total, scratch);
  }
}

// total += the column sums of `rows` (total = them where `fresh`), summed in total's precision;
// bfloat16 rows into a float32 total in one pass (PyTorch's sum converts the whole chunk first):
// blocks of rows summed in float, each block's sums then added
void add_column_sums(Tensor& total, const Tensor& rows, std::vector<float>& block, bool fresh) {
  if (!(rows.scalar_type() == at::kBFloat16 && total.scalar_type() == at::kFloat)) {
    const Tensor sums = at::sum(rows, {0}, false, total.scalar_type());
    fresh ? total.copy_(sums) : total.add_(sums);
    return;
  }
  const int64_t width = rows.size(1), count = rows.size(0);
  constexpr int64_t kRows = 64;
  const at::BFloat16* rp = rows.const_data_ptr<at::BFloat16>();
  block.resize(width);
  Tensor sums = at::from_blob(block.data(), {width}, total.options());
  for (int64_t first = 0; first < count; first += kRows) {
    std::fill(block.begin(), block.end(), 0.f);
    for (int64_t r = first; r < std::min(count, first + kRows); ++r) {
      const at::BFloat16* row = rp + r * width;
      int64_t c = 0;
      for (; c + BVec::size() <= width; c += BVec::size()) {
        const auto [low, high] = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(row + c));
        (Vec::loadu(block.data() + c) + low).store(block.data() + c);
        (Vec::loadu(block.data() + c + Vec::size()) + high).store(block.data() + c + Vec::size());
      }
      for (; c < width; ++c) block[c] += static_cast<float>(row[c]);
    }
    first == 0 && fresh ? total.copy_(sums) : total.add_(sums);
  }
}

// one of activations.cpp's compiled passes, found through the dispatcher (the same library registers it)
template <typename Signature>
c10::TypedOperatorHandle<Signature> compiled_pass(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The activation: GELU, or StarReLU (scale * relu(h)^2 + bias) where its scale and bias are given.
// The compiled passes of activations.cpp for float32 and bfloat16, PyTorch's operators otherwise
// (float64: the tests' gradchecks).
struct Activation {
  using In = const Tensor&;  // (the passes' signatures)
  std::optional<Tensor> scale, bias;

  static bool compiled(const Tensor& h) {
    return h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16;
  }

  // whether fc1's bias is better added in the activation's pass (bias_gelu: float32 GELU) than by
  // the product (addmm: the bias written over the output first, a pass of its own)
  static bool takes_bias(const std::optional<Tensor>& scale, const Tensor& h,
                         const std::optional<Tensor>& b1) {
    return b1.has_value() && !scale.has_value() && h.scalar_type() == at::kFloat;
  }

  // fc1's output `product` (without its bias) and bias: h = product + b1 in place, out = act(h)
  void forward(const Tensor& product, const std::optional<Tensor>& b1, Tensor& out) const {
    if (takes_bias(scale, product, b1)) {
      static const auto op = compiled_pass<void(In, In, In)>("mmpoolformer::bias_gelu");
      op.call(product, *b1, out);
    } else {
      forward(product, out);
    }
  }

  void forward(const Tensor& h, Tensor& out) const {
    if (!scale.has_value() && compiled(h)) {
      static const auto op = compiled_pass<void(In, In)>("mmpoolformer::gelu");
      op.call(h, out);
    } else if (!scale.has_value()) {
      at::gelu_out(out, h);
    } else if (compiled(h)) {
      static const auto op = compiled_pass<void(In, In, In, In)>("mmpoolformer::star_relu");
      op.call(h, out, *scale, *bias);
    } else {
      at::mul_out(out, at::relu(h).square(), *scale).add_(*bias);
    }
  }

  // the value into `value` and the backward of `grad` in place; StarReLU's adds the gradients of
  // its scale and bias to sums[0] and sums[1]
  void value_and_grad(const Tensor& h, Tensor& value, Tensor& grad, double* sums) const {
    if (!scale.has_value()) {
      if (compiled(h)) {
        static const auto op = compiled_pass<void(In, In, In)>("mmpoolformer::gelu_value_and_grad");
        op.call(h, value, grad);
      } else {
        at::gelu_out(value, h);
        at::gelu_backward_out(grad, grad, h);
      }
      return;
    }
    if (compiled(h)) {
      static const auto op = compiled_pass<Tensor(In, In, const std::optional<Tensor>&, In, In)>(
          "mmpoolformer::star_relu_backward");
      const Tensor parts = op.call(h, grad, value, *scale, *bias);
      sums[0] += parts[0].item<double>();
      sums[1] += parts[1].item<double>();
      return;
    }
    const Tensor relu = at::relu(h);
    sums[0] += (grad * relu.square()).sum().item<double>();
    sums[1] += grad.sum().item<double>();
    at::mul_out(value, relu.square(), *scale).add_(*bias);
    grad.mul_(relu * *scale * 2);
  }
};

// out = res_scale * x + scale * bias, each where given, in one pass (out may be x itself: an
// inference residual written over its input)
void residual(Tensor& out, const Tensor& x, const std::optional<Tensor>& res_scale,
              const std::optional<Tensor>& bias, double scale) {
  if (res_scale.has_value() && bias.has_value()) {
    at::addcmul_out(out, *bias * scale, x, *res_scale);
  } else if (bias.has_value()) {
    at::add_out(out, x, *bias, scale);
  } else if (res_scale.has_value()) {
    at::mul_out(out, x, *res_scale);
  } else if (out.data_ptr() != x.data_ptr()) {
    out.copy_(x);
  }
}

// out = res_scale * x + scale * fc2(act(fc1(norm(x)))); fc1's output into `hidden` where given (kept
// for backward). Without w2, the first half: out = act(fc1(norm(x))), rows of fc1's width (b2,
// res_scale none, scale 1). `out` may be x itself (inference): a chunk's rows are normalised before
// its output is written over them, and no chunk reads another's.
void mlp_forward(const Tensor& x, const std::optional<Tensor>& a, const std::optional<Tensor>& b,
                 bool per_row, double eps, const Tensor& w1,
                 const std::optional<Tensor>& b1, const std::optional<Tensor>& w2,
                 const std::optional<Tensor>& b2,
                 const std::optional<Tensor>& res_scale, const std::optional<Tensor>& act_scale,
                 const std::optional<Tensor>& act_bias, double scale, int64_t per_sample, int64_t rows,
                 const Tensor& out, const std::optional<Tensor>& hidden) {
  const Activation activation{act_scale, act_bias};
  const Norm norm{a, b, per_row, eps, per_sample};
  const int64_t channels = x.size(1), hidden_size = w1.size(0);
  const bool low = w1.scalar_type() != x.scalar_type();  // (bfloat16 products)
  const bool first_half = !w2.has_value();
  check_arguments(x, {&x}, hidden, w1, "mlp_forward");
  check_rows(out, x, first_half ? hidden_size : channels, x.scalar_type(), "mlp_forward");
  TORCH_CHECK(!first_half || (!b2.has_value() && !res_scale.has_value() && scale == 1.),
              "mlp_forward's first half (no w2) takes no b2, res_scale or scale");
  const bool apart = kept_apart(hidden, w1);
  const Chunks chunks(x.size(0), rows);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    // (the other threads do not inherit the caller's thread-local state: autograd stays out here)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Buffers buf(chunks.length, channels, hidden_size, w1.options(), false);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = chunks.first(c), k = chunks.size(c);
      Tensor normed = buf.normed.narrow(0, 0, k);
      norm.apply(x, first, k, normed);
      Tensor h = hidden.has_value() && !apart ? hidden->narrow(0, first, k)
                                              : buf.hidden.narrow(0, 0, k);
      const bool bias_later = Activation::takes_bias(act_scale, h, b1);
      product_out(h, normed, w1.t(), bias_later ? std::nullopt : b1);
      Tensor oc = out.narrow(0, first, k);
      // the activation where it is read next: the first half's straight into the output where the
      // dtypes agree; else over fc1's output where that is not kept (one buffer fewer in cache)
      Tensor act = first_half && !low ? oc : hidden.has_value() ? buf.act.narrow(0, 0, k) : h;
      activation.forward(h, bias_later ? b1 : std::nullopt, act);
      if (apart) hidden->narrow(0, first, k).copy_(h);  // (with the bias the activation's pass added)
      if (first_half) {
        if (low) oc.copy_(act);
        continue;
      }
      residual(oc, x.narrow(0, first, k), res_scale, b2, scale);
      if (low) {  // fc2's output in the products' dtype, then added
        Tensor branch = buf.channels_low.narrow(0, 0, k);
        at::mm_out(branch, act, w2->t());
        oc.add_(branch, scale);
      } else {
        oc.addmm_(act, w2->t(), 1., scale);
      }
    }
  });
}

// The branch's backward up to the normalised rows (GroupNorm, whose backward needs the whole map's:
// their gradient into `grad_rows`) or to the rows (a per-row norm: their gradient into `grad_rows`),
// and the gradients of fc1's and fc2's weights and biases and a per-row norm's weight and bias
// written into the given tensors, StarReLU's scale and bias added into theirs (None: not needed).
// Without w2, the first half's: `grad` is the activation's output's, rows of fc1's width.
void mlp_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& a,
                  const std::optional<Tensor>& b, bool per_row, double eps, const Tensor& w1,
                  const std::optional<Tensor>& b1, const std::optional<Tensor>& w2,
                  const std::optional<Tensor>& hidden,
                  const std::optional<Tensor>& act_scale, const std::optional<Tensor>& act_bias,
                  double scale, int64_t per_sample, int64_t rows, const Tensor& grad_rows,
                  const std::optional<Tensor>& grad_w1, const std::optional<Tensor>& grad_b1,
                  const std::optional<Tensor>& grad_w2, const std::optional<Tensor>& grad_b2,
                  const std::optional<Tensor>& grad_act_scale,
                  const std::optional<Tensor>& grad_act_bias,
                  const std::optional<Tensor>& grad_norm_weight,
                  const std::optional<Tensor>& grad_norm_bias) {
  const Activation activation{act_scale, act_bias};
  const Norm norm{a, b, per_row, eps, per_sample};
  const int64_t channels = x.size(1), hidden_size = w1.size(0);
  const bool low = w1.scalar_type() != x.scalar_type();  // (bfloat16 products)
  const bool first_half = !w2.has_value();
  check_arguments(x, {&grad_rows}, hidden, w1, "mlp_backward");
  check_rows(grad, x, first_half ? hidden_size : channels, x.scalar_type(), "mlp_backward");
  TORCH_CHECK(!first_half || (!grad_w2.has_value() && !grad_b2.has_value() && scale == 1.),
              "mlp_backward's first half (no w2) has no fc2 gradients and no scale");
  const Chunks chunks(x.size(0), rows);
  const int64_t threads = at::get_num_threads();
  // each thread's own gradient sums, added in thread order afterwards: the first thread's are the
  // totals themselves, the others' tensors of their own, each written by its thread's first chunk
  // (`fresh` until then), so that no thread zeroes or adds a copy of every weight
  std::vector<std::vector<Tensor>> parts(threads);
  std::vector<char> fresh(threads, 1);
  std::vector<double> act_sums(2 * threads, 0.);  // StarReLU's scale and bias, per thread
  const std::vector<std::optional<Tensor>> totals = {grad_w1, grad_b1, grad_w2, grad_b2,
                                                     grad_norm_weight, grad_norm_bias};
  const Tensor w1_t = w1.t();
  const bool apart = kept_apart(hidden, w1);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    // (the other threads do not inherit the caller's thread-local state: autograd stays out here)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Buffers buf(chunks.length, channels, hidden_size, w1.options(), true);
    const int64_t thread = at::get_thread_num();
    std::vector<Tensor>& mine = parts[thread];
    if (mine.empty()) {
      for (const auto& total : totals)
        mine.push_back(!total.has_value() ? Tensor() : thread == 0 ? *total : at::empty_like(*total));
    }
    Tensor &gw1 = mine[0], &gb1 = mine[1], &gw2 = mine[2], &gb2 = mine[3];
    Tensor &grad_weight = mine[4], &grad_bias = mine[5];
    const Tensor rows_buffer = per_row ? at::empty({chunks.length, channels}, x.options()) : Tensor();
    Tensor product_w1, product_w2;  // (bfloat16 products of the weights' gradients, before the sums)
    std::vector<float> column_block;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = chunks.first(c), k = chunks.size(c);
      Tensor gc = grad.narrow(0, first, k);
      if ((scale != 1. || low) && !first_half) {  // (scaled, or cast to the products' dtype)
        Tensor scaled = buf.grad.narrow(0, 0, k);
        gc = scale != 1. ? at::mul_out(scaled, gc, at::scalar_tensor(scale, gc.options()))
                         : scaled.copy_(gc);
      }
      Tensor normed = buf.normed.narrow(0, 0, k);
      const auto stats = norm.apply(x, first, k, normed);
      Tensor h = hidden.has_value() && !apart ? hidden->narrow(0, first, k)
                                              : buf.hidden.narrow(0, 0, k);
      if (apart) {
        h.copy_(hidden->narrow(0, first, k));
      } else if (!hidden.has_value()) {
        const bool bias_later = Activation::takes_bias(act_scale, h, b1);
        product_out(h, normed, w1_t, bias_later ? std::nullopt : b1);
        if (bias_later) h.add_(*b1);  // (rounded as forward's bias_gelu rounded it)
      }
      const bool first_sums = fresh[thread];
      fresh[thread] = 0;
      if (gb2.defined()) add_column_sums(gb2, gc, column_block, first_sums);
      Tensor gh = buf.grad_hidden.narrow(0, 0, k), value = buf.act.narrow(0, 0, k);
      if (first_half) {  // (the joint pass's value unused: it costs little beside the derivative)
        gh.copy_(gc);
      } else {
        at::mm_out(gh, gc, *w2);
      }
      activation.value_and_grad(h, value, gh, act_sums.data() + 2 * at::get_thread_num());
      if (gw2.defined()) accumulate(gw2, gc.t(), value, product_w2, first_sums);
      if (gw1.defined()) accumulate(gw1, gh.t(), normed, product_w1, first_sums);
      if (gb1.defined()) add_column_sums(gb1, gh, column_block, first_sums);
      // the normalised rows' gradient, in the rows' precision: GroupNorm's into `grad_rows`
      Tensor gn = per_row ? rows_buffer.narrow(0, 0, k) : grad_rows.narrow(0, first, k);
      if (low) {
        Tensor part = buf.channels_low.narrow(0, 0, k);
        gn.copy_(at::mm_out(part, gh, w1));
      } else {
        at::mm_out(gn, gh, w1);
      }
      if (per_row)
        norm.backward_rows(gn, x, first, k, stats, grad_rows, grad_weight, grad_bias, first_sums);
    }
  });
  for (size_t i = 0; i < totals.size(); ++i) {
    if (!totals[i].has_value()) continue;
    if (fresh[0]) totals[i]->zero_();  // (a thread that took no chunk has no sums)
    for (int64_t thread = 1; thread < threads; ++thread)
      if (!fresh[thread]) totals[i]->add_(parts[thread][i]);
  }
  const std::optional<Tensor> act_grads[] = {grad_act_scale, grad_act_bias};
  for (int64_t i = 0; i < 2; ++i) {
    if (!act_grads[i].has_value()) continue;
    double total = 0.;
    for (int64_t t = 0; t < threads; ++t) total += act_sums[2 * t + i];
    act_grads[i]->add_(total);
  }
}

// ConvFormer's SepConv as a residual branch, in inference (sep_conv.py):
//   out = res_scale * x + scale * pw2(dw(act(pw1(norm(x))))),
// x and out (N * height * width, C) channels-last rows, w1 (hidden, C), dw (hidden, 1, k, k) of odd k
// with zero padding k / 2, w2 (C, hidden) with the LayerScale folded in, b2 joining the residual.
// Band by band of `band` image rows: the band's rows are expanded (norm, pw1, act) into a window that
// also holds the k - 1 expanded rows around them which the depthwise filter reads (carried over from
// the band above, not recomputed), the filter runs over the window, and the projection adds the band's
// output to its residual. Neither the expanded map nor the filtered one (each twice the block's width)
// is written whole: a band's stay in cache, and no map of the whole image is allocated (at stage 0 of
// ConvFormer-S18 at 2x512x512 each was 16 MB, freshly faulted in on every call). Each thread takes
// runs of rows of one sample (a sample split in as many runs as make the threads' shares equal; each
// run expands the k / 2 rows above and below it again).
void sep_conv_forward(const Tensor& x, const std::optional<Tensor>& a, const std::optional<Tensor>& b,
                      bool per_row, double eps, const Tensor& w1, const std::optional<Tensor>& b1,
                      const Tensor& dw, const std::optional<Tensor>& dw_bias, const Tensor& w2,
                      const std::optional<Tensor>& b2, const std::optional<Tensor>& res_scale,
                      const std::optional<Tensor>& act_scale, const std::optional<Tensor>& act_bias,
                      double scale, int64_t height, int64_t width, int64_t band, const Tensor& out) {
  const int64_t per_sample = height * width;
  const Activation activation{act_scale, act_bias};
  const Norm norm{a, b, per_row, eps, per_sample};
  const int64_t channels = x.size(1), hidden = w1.size(0), kernel = dw.size(-1), pad = kernel / 2;
  const bool low = w1.scalar_type() != x.scalar_type();  // (bfloat16 products)
  check_arguments(x, {&x, &out}, std::nullopt, w1, "sep_conv_forward");
  TORCH_CHECK(at::get_overlap_status(out, x) == at::MemOverlapStatus::No,
              "sep_conv_forward writes a map of its own: a band's filter reads the rows below it, "
              "which writing over x would have replaced");
  TORCH_CHECK(height > 0 && width > 0 && band > 0 && x.size(0) % per_sample == 0,
              "sep_conv_forward: ", x.size(0), " rows are not whole samples of ", height, " x ", width,
              " tokens (band ", band, ")");
  TORCH_CHECK(dw.dim() == 4 && dw.size(0) == hidden && dw.size(1) == 1 && dw.size(2) == kernel &&
                  kernel % 2 == 1 && dw.scalar_type() == w1.scalar_type(),
              "sep_conv_forward takes a (", hidden, ", 1, k, k) depthwise filter of odd k in ",
              w1.scalar_type(), ", got ", dw.sizes(), " ", dw.scalar_type());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == channels && w2.size(1) == hidden &&
                  w2.scalar_type() == w1.scalar_type(),
              "sep_conv_forward takes a (", channels, ", ", hidden, ") projection, got ", w2.sizes());
  const int64_t samples = x.size(0) / per_sample, threads = at::get_num_threads();
  const int64_t runs = std::min(height, threads / std::gcd(samples, threads));  // per sample
  const int64_t rows = std::min(band, height);  // image rows per band
  at::parallel_for(0, samples * runs, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor window = at::empty({(rows + 2 * pad) * width, hidden}, w1.options());
    Tensor normed = at::empty({rows * width, channels}, w1.options()), branch;
    const int64_t row_bytes = width * hidden * window.element_size();
    // image rows [first, last) of sample s expanded into the window from its row `into`; rows outside
    // the image are the filter's zero padding
    auto expand = [&](int64_t s, int64_t first, int64_t last, int64_t into) {
      for (int64_t q = first; q < last;) {
        if (q < 0 || q >= height) {
          window.narrow(0, (into + q - first) * width, width).zero_();
          ++q;
          continue;
        }
        const int64_t next = std::min({last, height, q + rows}), k = (next - q) * width;
        Tensor nr = normed.narrow(0, 0, k), h = window.narrow(0, (into + q - first) * width, k);
        norm.apply(x, (s * height + q) * width, k, nr);
        const bool bias_later = Activation::takes_bias(act_scale, h, b1);
        product_out(h, nr, w1.t(), bias_later ? std::nullopt : b1);
        activation.forward(h, bias_later ? b1 : std::nullopt, h);  // (in place)
        q = next;
      }
    };
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t s = unit / runs, run = unit % runs;
      const int64_t first = height * run / runs, last = height * (run + 1) / runs;
      expand(s, first - pad, first + pad, 0);  // the rows the first band's filter reads first
      for (int64_t top = first; top < last; top += rows) {
        const int64_t r = std::min(rows, last - top);
        expand(s, top + pad, top + r + pad, 2 * pad);
        // the window as a channels-last (1, hidden, r + 2 pad, width) map: padded across, not down
        const Tensor input = window.narrow(0, 0, (r + 2 * pad) * width)
                                 .view({1, r + 2 * pad, width, hidden})
                                 .permute({0, 3, 1, 2});
        const Tensor filtered =
            at::conv2d(input, dw, dw_bias, at::IntArrayRef{1, 1}, at::IntArrayRef{0, pad},
                       at::IntArrayRef{1, 1}, hidden)
                .permute({0, 2, 3, 1})
                .reshape({r * width, hidden});
        const int64_t at_row = (s * height + top) * width;
        Tensor oc = out.narrow(0, at_row, r * width);
        residual(oc, x.narrow(0, at_row, r * width), res_scale, b2, scale);
        if (low) {  // (the projection in the products' dtype, then added)
          if (!branch.defined()) branch = at::empty({rows * width, channels}, w1.options());
          Tensor part = branch.narrow(0, 0, r * width);
          at::mm_out(part, filtered, w2.t());
          oc.add_(part, scale);
        } else {
          oc.addmm_(filtered, w2.t(), 1., scale);
        }
        if (top + r < last) {  // the window's last 2 pad rows are the next band's first
          char* base = static_cast<char*>(window.data_ptr());
          std::memmove(base, base + r * row_bytes, 2 * pad * row_bytes);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmpoolformer, m) {
  m.def("mlp_forward(Tensor x, Tensor? a, Tensor? b, bool per_row, float eps, Tensor w1, Tensor? b1, "
        "Tensor? w2, Tensor? b2, Tensor? res_scale, Tensor? act_scale, Tensor? act_bias, float scale, "
        "int per_sample, int rows, Tensor(a!) out, Tensor(b!)? hidden) -> ()");
  m.def("mlp_backward(Tensor grad, Tensor x, Tensor? a, Tensor? b, bool per_row, float eps, Tensor w1, "
        "Tensor? b1, Tensor? w2, Tensor? hidden, Tensor? act_scale, Tensor? act_bias, float scale, "
        "int per_sample, int rows, Tensor(a!) grad_rows, Tensor(b!)? grad_w1, Tensor(c!)? grad_b1, "
        "Tensor(d!)? grad_w2, Tensor(e!)? grad_b2, Tensor(f!)? grad_act_scale, "
        "Tensor(g!)? grad_act_bias, Tensor(h!)? grad_norm_weight, Tensor(i!)? grad_norm_bias) -> ()");
  m.def("sep_conv_forward(Tensor x, Tensor? a, Tensor? b, bool per_row, float eps, Tensor w1, "
        "Tensor? b1, Tensor dw, Tensor? dw_bias, Tensor w2, Tensor? b2, Tensor? res_scale, "
        "Tensor? act_scale, Tensor? act_bias, float scale, int height, int width, int band, "
        "Tensor(a!) out) -> ()");
  m.impl("mlp_forward", c10::DispatchKey::CPU, TORCH_FN(mlp_forward));
  m.impl("mlp_backward", c10::DispatchKey::CPU, TORCH_FN(mlp_backward));
  m.impl("sep_conv_forward", c10::DispatchKey::CPU, TORCH_FN(sep_conv_forward));
}
