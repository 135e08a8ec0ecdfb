// zerofx::lamb_moments_ and zerofx::lamb_apply_ on CUDA: the two passes of fused_lamb.cpp.
// Each block takes one kChunk-element chunk of the flat shard; a thread walks its elements in
// order and tracks which tensor they belong to (tensor_bounds, on the device), so one launch
// covers every tensor of the shard. Per-tensor sums: a block inside one tensor adds its block
// sum with one atomic; a block across tensor boundaries adds per-thread partial sums.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda_common.h"

namespace zerofx {
namespace {

constexpr int64_t kChunk = 4096;

struct LambArgs {
  double beta2;  // beta1 is a device scalar: a schedule may move it per step
  float eps, weight_decay;
  bool eps_inside_sqrt, bias_correction;
};

struct Layout {
  const int64_t* bounds;  // [num_tensors + 1] flat offsets
  int64_t num_tensors, offset, n;
};

__device__ __forceinline__ float lamb_direction(const LambArgs& a, float p, float m, float v) {
  const float denom = a.eps_inside_sqrt ? sqrtf(v + a.eps) : sqrtf(v) + a.eps;
  return m / denom + a.weight_decay * p;
}

__device__ __forceinline__ void flush(float* sums, const Layout& l, int64_t t, float& w,
                                      float& u) {
  if (t >= 0 && t < l.num_tensors && (w != 0.f || u != 0.f)) {
    atomicAdd(sums + t, w);
    atomicAdd(sums + l.num_tensors + t, u);
  }
  w = u = 0.f;
}

template <typename G>
__global__ void lamb_moments_kernel(const float* __restrict__ p, const G* __restrict__ g,
                                    float* __restrict__ m, float* __restrict__ v, Layout l,
                                    const float* grad_scale, const float* skip,
                                    const double* beta1_d, LambArgs a,
                                    float* __restrict__ sums) {
  if (*skip != 0.f) return;  // overflow: moments untouched, sums stay zero
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, l.n);
  __shared__ int64_t first, last;
  if (threadIdx.x == 0) {
    first = tensor_of(l.bounds, l.num_tensors, l.offset + begin);
    last = tensor_of(l.bounds, l.num_tensors, l.offset + end - 1);
  }
  __syncthreads();
  const float gs = *grad_scale, beta1 = *beta1_d, beta2 = a.beta2;
  const float omb1 = 1.0 - *beta1_d, omb2 = 1.0 - a.beta2;
  float w = 0.f, u = 0.f;
  int64_t t = first;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    while (t < l.num_tensors && l.offset + i >= l.bounds[t + 1]) flush(sums, l, t++, w, u);
    if (t < 0 || t >= l.num_tensors || l.offset + i < l.bounds[t]) continue;  // padding
    const float gi = to_float(g[i]) * gs, pi = p[i];
    const float mi = beta1 * m[i] + omb1 * gi, vi = beta2 * v[i] + omb2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float d = lamb_direction(a, pi, mi, vi);
    w += pi * pi;
    u += d * d;
  }
  if (first == last) {  // uniform across the block: one atomic per sum
    w = block_sum(w);
    u = block_sum(u);
    if (threadIdx.x == 0) flush(sums, l, first, w, u);
  } else {
    flush(sums, l, t, w, u);
  }
}

template <typename O>
__global__ void lamb_apply_kernel(float* __restrict__ p, const float* __restrict__ m,
                                  const float* __restrict__ v, O* __restrict__ out, Layout l,
                                  const float* __restrict__ trust_ratio, const float* lr,
                                  const float* step, const float* skip, const double* beta1,
                                  LambArgs a) {
  if (*skip != 0.f) return;
  const DeviceBiasCorrection bc = device_bias_correction(a.bias_correction, *beta1, a.beta2,
                                                         *step);
  const double step_size = static_cast<double>(*lr) * bc.bc2_sqrt / bc.bc1;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, l.n);
  int64_t t = tensor_of(l.bounds, l.num_tensors, l.offset + begin);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    while (t < l.num_tensors && l.offset + i >= l.bounds[t + 1]) ++t;
    if (t < 0 || t >= l.num_tensors || l.offset + i < l.bounds[t]) continue;  // padding
    const float neg_scale = static_cast<float>(-step_size * trust_ratio[t]);
    const float pi = p[i] + neg_scale * lamb_direction(a, p[i], m[i], v[i]);
    p[i] = pi;
    store_as(out, i, pi);
  }
}

Layout layout_of(const at::Tensor& bounds, const at::Tensor& param, int64_t shard_offset) {
  TORCH_CHECK(bounds.dim() == 1 && bounds.numel() >= 1 && bounds.scalar_type() == at::kLong,
              "tensor_bounds must be a 1-d int64 tensor of tensor start offsets plus the end");
  TORCH_CHECK(bounds.device() == param.device(), "tensor_bounds must be on param's device");
  TORCH_CHECK(bounds.is_contiguous(), "tensor_bounds must be contiguous");
  return {bounds.const_data_ptr<int64_t>(), bounds.numel() - 1, shard_offset, param.numel()};
}

unsigned int chunks(int64_t n) { return static_cast<unsigned int>((n + kChunk - 1) / kChunk); }

at::Tensor lamb_moments_cuda(const at::Tensor& param, const at::Tensor& grad,
                             const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                             const at::Tensor& tensor_bounds, const at::Tensor& grad_scale,
                             const at::Tensor& skip, int64_t shard_offset,
                             const at::Tensor& beta1, double beta2, double eps,
                             double weight_decay, bool eps_inside_sqrt) {
  check_state(param, param, "param");
  check_same_shape(grad, param, "grad");
  check_state(exp_avg, param, "exp_avg");
  check_state(exp_avg_sq, param, "exp_avg_sq");
  const c10::cuda::CUDAGuard guard(param.device());
  const Layout l = layout_of(tensor_bounds, param, shard_offset);
  at::Tensor sums = at::zeros({2, l.num_tensors}, param.options());
  if (l.n == 0 || l.num_tensors == 0) return sums;
  const at::Tensor gs_d = device_scalar(grad_scale, param, "grad_scale");
  const at::Tensor skip_d = device_scalar(skip, param, "skip");
  const at::Tensor beta1_d = device_scalar_f64(beta1, param, "beta1");
  const LambArgs a{beta2, static_cast<float>(eps), static_cast<float>(weight_decay),
                   eps_inside_sqrt, false};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_out(grad.scalar_type(), std::nullopt, [&](auto g_tag, auto) {
    using G = typename decltype(g_tag)::type;
    lamb_moments_kernel<G><<<chunks(l.n), kThreads, 0, stream>>>(
        param.const_data_ptr<float>(), grad.const_data_ptr<G>(), exp_avg.data_ptr<float>(),
        exp_avg_sq.data_ptr<float>(), l, gs_d.const_data_ptr<float>(),
        skip_d.const_data_ptr<float>(), beta1_d.const_data_ptr<double>(), a,
        sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sums;
}

void lamb_apply_cuda(const at::Tensor& param, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_out,
                     const at::Tensor& tensor_bounds, const at::Tensor& trust_ratio,
                     const at::Tensor& lr, const at::Tensor& step, const at::Tensor& skip,
                     int64_t shard_offset, const at::Tensor& beta1, double beta2, double eps,
                     double weight_decay, bool bias_correction, bool eps_inside_sqrt) {
  const auto out = check_update_state(param, exp_avg, exp_avg_sq, param_out);
  const c10::cuda::CUDAGuard guard(param.device());
  const Layout l = layout_of(tensor_bounds, param, shard_offset);
  TORCH_CHECK(trust_ratio.numel() == l.num_tensors && trust_ratio.scalar_type() == at::kFloat &&
                  trust_ratio.device() == param.device() && trust_ratio.is_contiguous(),
              "trust_ratio must be a contiguous float32 tensor on param's device, one per tensor");
  if (l.n == 0 || l.num_tensors == 0) return;
  const at::Tensor lr_d = device_scalar(lr, param, "lr");
  const at::Tensor step_d = device_scalar(step, param, "step");
  const at::Tensor skip_d = device_scalar(skip, param, "skip");
  const at::Tensor beta1_d = device_scalar_f64(beta1, param, "beta1");
  const LambArgs a{beta2, static_cast<float>(eps), static_cast<float>(weight_decay),
                   eps_inside_sqrt, bias_correction};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_grad_out(at::kFloat, out, [&](auto, auto o_tag) {
    using O = typename decltype(o_tag)::type;
    O* out_ptr = nullptr;
    if constexpr (!std::is_same_v<O, NoOut>) out_ptr = param_out->data_ptr<O>();
    lamb_apply_kernel<O><<<chunks(l.n), kThreads, 0, stream>>>(
        param.data_ptr<float>(), exp_avg.const_data_ptr<float>(),
        exp_avg_sq.const_data_ptr<float>(), out_ptr, l, trust_ratio.const_data_ptr<float>(),
        lr_d.const_data_ptr<float>(), step_d.const_data_ptr<float>(),
        skip_d.const_data_ptr<float>(), beta1_d.const_data_ptr<double>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zerofx, CUDA, m) {
  m.impl("lamb_moments_", &lamb_moments_cuda);
  m.impl("lamb_apply_", &lamb_apply_cuda);
}

}  // namespace zerofx
