// zerofx::adam_step_ on CUDA: the same one-pass step as fused_adam.cpp, as one grid-stride
// launch over the rank's whole flat shard (the flat shard already is the "multi-tensor" batch:
// every parameter of the rank in one buffer, one launch). lr, step, grad_scale, skip and beta1
// are read on the device, so nothing here waits for the GPU.
#include <torch/library.h>

#include "cuda_common.h"

namespace zerofx {
namespace {

struct AdamArgs {
  double beta2;
  float eps, weight_decay;
  bool bias_correction, adam_w_mode;
};

struct StepScalars {
  const float* lr;
  const float* step;
  const float* grad_scale;
  const float* skip;
  const double* beta1;  // double: a schedule's value, exactly as configured
};

template <typename G, typename O>
__global__ void adam_kernel(float* __restrict__ p, const G* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, O* __restrict__ out, int64_t n,
                            StepScalars s, AdamArgs a) {
  if (*s.skip != 0.f) return;  // overflow: leave every tensor untouched
  const double lr = *s.lr, beta1 = *s.beta1;
  const DeviceBiasCorrection bc = device_bias_correction(a.bias_correction, beta1, a.beta2,
                                                         *s.step);
  const float neg_step_size = static_cast<float>(-lr / bc.bc1);
  const float inv_bc2_sqrt = static_cast<float>(1.0 / bc.bc2_sqrt);
  const float decay_keep = static_cast<float>(1.0 - lr * a.weight_decay);
  const float omb1 = static_cast<float>(1.0 - beta1), beta2 = static_cast<float>(a.beta2);
  const float omb2 = static_cast<float>(1.0 - a.beta2), grad_scale = *s.grad_scale;
  const bool l2 = a.weight_decay != 0.f && !a.adam_w_mode;
  const bool decay = a.weight_decay != 0.f && a.adam_w_mode;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    float gi = to_float(g[i]) * grad_scale;
    if (l2) gi = gi + pi * a.weight_decay;
    mi = mi + omb1 * (gi - mi);
    vi = vi * beta2 + omb2 * gi * gi;
    if (decay) pi = pi * decay_keep;
    const float denom = sqrtf(vi) * inv_bc2_sqrt + a.eps;
    pi = pi + neg_step_size * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    store_as(out, i, pi);
  }
}

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_out,
                    const at::Tensor& lr, const at::Tensor& step, const at::Tensor& grad_scale,
                    const at::Tensor& skip, const at::Tensor& beta1, double beta2, double eps,
                    double weight_decay, bool bias_correction, bool adam_w_mode) {
  const auto out = check_update_state(param, exp_avg, exp_avg_sq, param_out);
  check_same_shape(grad, param, "grad");
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor lr_d = device_scalar(lr, param, "lr");
  const at::Tensor step_d = device_scalar(step, param, "step");
  const at::Tensor gs_d = device_scalar(grad_scale, param, "grad_scale");
  const at::Tensor skip_d = device_scalar(skip, param, "skip");
  const at::Tensor beta1_d = device_scalar_f64(beta1, param, "beta1");
  const StepScalars s{lr_d.const_data_ptr<float>(), step_d.const_data_ptr<float>(),
                      gs_d.const_data_ptr<float>(), skip_d.const_data_ptr<float>(),
                      beta1_d.const_data_ptr<double>()};
  const AdamArgs a{beta2, static_cast<float>(eps), static_cast<float>(weight_decay),
                   bias_correction, adam_w_mode};
  const unsigned int blocks = grid_blocks(n, param);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_out(grad.scalar_type(), out, [&](auto g_tag, auto o_tag) {
    using G = typename decltype(g_tag)::type;
    using O = typename decltype(o_tag)::type;
    O* out_ptr = nullptr;
    if constexpr (!std::is_same_v<O, NoOut>) out_ptr = param_out->data_ptr<O>();
    adam_kernel<G, O><<<blocks, kThreads, 0, stream>>>(
        param.data_ptr<float>(), grad.const_data_ptr<G>(), exp_avg.data_ptr<float>(),
        exp_avg_sq.data_ptr<float>(), out_ptr, n, s, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zerofx, CUDA, m) { m.impl("adam_step_", &adam_step_cuda); }

}  // namespace zerofx
