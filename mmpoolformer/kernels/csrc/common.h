// What the compiled kernels share: at::vec's float vector (AVX2 or AVX-512, as native.py builds them)
// and the check of the tensors they are given.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

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

}  // namespace mmpoolformer
