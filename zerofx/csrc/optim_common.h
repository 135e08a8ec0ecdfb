// Shared host-side pieces of the fused optimizer ops (CPU and CUDA): argument checks, the
// per-step 0-d tensors, bias corrections and the gradient / copy dtype dispatch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <optional>
#include <utility>

namespace zerofx {

template <typename T>
struct Tag {
  using type = T;
};
// Tag type for "no compute-dtype copy requested": its stores compile to nothing.
struct NoOut {};

inline void check_state(const at::Tensor& t, const at::Tensor& param, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == param.numel(), name, " has ", t.numel(), " elements, param ",
              param.numel());
  TORCH_CHECK(t.device() == param.device(), name, " is on ", t.device(), ", param on ",
              param.device());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& param, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == param.numel(), name, " has ", t.numel(), " elements, param ",
              param.numel());
  TORCH_CHECK(t.device() == param.device(), name, " is on ", t.device(), ", param on ",
              param.device());
}

inline void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, name, " must be a one-element tensor, got shape ", t.sizes());
}

// Host value of a one-element CPU tensor (a plain memory read: no device sync involved).
inline double host_scalar(const at::Tensor& t, const char* name) {
  check_scalar(t, name);
  return t.item<double>();
}

// Adam's bias corrections, in double like torch.optim.Adam's Python-float arithmetic.
struct BiasCorrection {
  double bc1 = 1.0;       // 1 - beta1^step
  double bc2_sqrt = 1.0;  // sqrt(1 - beta2^step)
};

inline BiasCorrection bias_correction(bool enabled, double beta1, double beta2, double step) {
  if (!enabled) return {};
  return {1.0 - std::pow(beta1, step), std::sqrt(1.0 - std::pow(beta2, step))};
}

// Calls f(Tag<G>{}, Tag<O>{}) with G the gradient's element type and O the element type of the
// compute-dtype copy (NoOut when none is requested).
template <typename F>
void dispatch_grad_out(at::ScalarType grad, std::optional<at::ScalarType> out, const F& f) {
  auto with_grad = [&](auto g) {
    if (!out) return f(g, Tag<NoOut>{});
    switch (*out) {
      case at::kFloat: return f(g, Tag<float>{});
      case at::kBFloat16: return f(g, Tag<c10::BFloat16>{});
      case at::kHalf: return f(g, Tag<c10::Half>{});
      default: TORCH_CHECK(false, "param_out must be float32, bfloat16 or float16, got ", *out);
    }
  };
  switch (grad) {
    case at::kFloat: return with_grad(Tag<float>{});
    case at::kBFloat16: return with_grad(Tag<c10::BFloat16>{});
    case at::kHalf: return with_grad(Tag<c10::Half>{});
    default: TORCH_CHECK(false, "grad must be float32, bfloat16 or float16, got ", grad);
  }
}

inline std::optional<at::ScalarType> out_dtype(const std::optional<at::Tensor>& param_out) {
  if (!param_out || !param_out->defined()) return std::nullopt;
  return param_out->scalar_type();
}

// The checks every update kernel starts with: fp32 state shaped like param, and the optional
// compute-dtype copy; returns that copy's dtype (nullopt when none is written).
inline std::optional<at::ScalarType> check_update_state(
    const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
    const std::optional<at::Tensor>& param_out) {
  check_state(param, param, "param");
  check_state(exp_avg, param, "exp_avg");
  check_state(exp_avg_sq, param, "exp_avg_sq");
  const auto out = out_dtype(param_out);
  if (out) check_same_shape(*param_out, param, "param_out");
  return out;
}

}  // namespace zerofx
