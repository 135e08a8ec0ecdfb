// zerofx::adam_step_ on CPU: one pass over a rank's flat fp32 shard reads the gradient (fp32,
// bf16 or fp16), scales it, updates both moments and the master weight, and writes the
// compute-dtype copy of the weight for the all-gather. Vectorised with at::vec, threaded with
// at::parallel_for. The schema lives in zerofx/runtime/optim_ops.py; this file adds the kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "optim_common.h"
#include "vec_io.h"

namespace zerofx {
namespace {

// Elements per thread task: large enough to amortise the task, small enough to balance.
constexpr int64_t kGrainSteps = 32768 / kStep;

struct AdamConsts {
  fVec grad_scale, omb1, beta2, omb2, eps, weight_decay, inv_bc2_sqrt, neg_step_size, decay_keep;
  bool l2;     // Adam: weight decay joins the gradient
  bool decay;  // AdamW: weight decay shrinks the weight
};

// One float vector of the step. The operation order follows torch.optim.Adam/AdamW's
// single-tensor path, so fp32 results agree with it to rounding. Forced inline: as a call it
// passes the vectors through memory and costs a quarter of the kernel's speed.
C10_ALWAYS_INLINE void adam_vec(const AdamConsts& c, fVec& p, fVec g, fVec& m, fVec& v) {
  g = g * c.grad_scale;
  if (c.l2) g = g + p * c.weight_decay;
  m = m + c.omb1 * (g - m);            // exp_avg.lerp_(grad, 1 - beta1)
  v = v * c.beta2 + c.omb2 * g * g;    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  if (c.decay) p = p * c.decay_keep;   // param.mul_(1 - lr * weight_decay)
  fVec denom = v.sqrt() * c.inv_bc2_sqrt + c.eps;
  p = p + c.neg_step_size * (m / denom);
}

template <typename G, typename O>
void run_adam(float* p, const G* g, float* m, float* v, O* out, int64_t n, const AdamConsts& cs) {
  const int64_t steps = (n + kStep - 1) / kStep;
  at::parallel_for(0, steps, kGrainSteps, [&](int64_t s0, int64_t s1) {
    const AdamConsts c = cs;  // a local copy: the stores below cannot alias it
    for_each_step(s0 * kStep, std::min(s1 * kStep, n), [&](int64_t i, int64_t k) {
      fVec p0, p1, g0, g1, m0, m1, v0, v1;
      Io<float>::load(p + i, k, p0, p1);
      Io<G>::load(g + i, k, g0, g1);
      Io<float>::load(m + i, k, m0, m1);
      Io<float>::load(v + i, k, v0, v1);
      adam_vec(c, p0, g0, m0, v0);
      adam_vec(c, p1, g1, m1, v1);
      Io<float>::store(p + i, k, p0, p1);
      Io<float>::store(m + i, k, m0, m1);
      Io<float>::store(v + i, k, v0, v1);
      Io<O>::store(at_offset(out, i), k, p0, p1);
    });
  });
}

AdamConsts adam_consts(double lr, double step, double grad_scale, double beta1, double beta2,
                       double eps, double weight_decay, bool bias_correction, bool adam_w_mode) {
  const BiasCorrection bc = zerofx::bias_correction(bias_correction, beta1, beta2, step);
  AdamConsts c;
  c.grad_scale = fVec(static_cast<float>(grad_scale));
  c.omb1 = fVec(static_cast<float>(1.0 - beta1));
  c.beta2 = fVec(static_cast<float>(beta2));
  c.omb2 = fVec(static_cast<float>(1.0 - beta2));
  c.eps = fVec(static_cast<float>(eps));
  c.weight_decay = fVec(static_cast<float>(weight_decay));
  c.inv_bc2_sqrt = fVec(static_cast<float>(1.0 / bc.bc2_sqrt));
  c.neg_step_size = fVec(static_cast<float>(-lr / bc.bc1));
  c.decay_keep = fVec(static_cast<float>(1.0 - lr * weight_decay));
  c.l2 = weight_decay != 0.0 && !adam_w_mode;
  c.decay = weight_decay != 0.0 && adam_w_mode;
  return c;
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_out,
                   const at::Tensor& lr, const at::Tensor& step, const at::Tensor& grad_scale,
                   const at::Tensor& skip, const at::Tensor& beta1, double beta2, double eps,
                   double weight_decay, bool bias_correction, bool adam_w_mode) {
  const auto out = check_update_state(param, exp_avg, exp_avg_sq, param_out);
  check_same_shape(grad, param, "grad");
  if (host_scalar(skip, "skip") != 0.0) return;  // overflow: leave every tensor untouched
  const AdamConsts c = adam_consts(host_scalar(lr, "lr"), host_scalar(step, "step"),
                                   host_scalar(grad_scale, "grad_scale"),
                                   host_scalar(beta1, "beta1"), beta2, eps,
                                   weight_decay, bias_correction, adam_w_mode);
  dispatch_grad_out(grad.scalar_type(), out, [&](auto g_tag, auto o_tag) {
    using G = typename decltype(g_tag)::type;
    using O = typename decltype(o_tag)::type;
    O* out_ptr = nullptr;
    if constexpr (!std::is_same_v<O, NoOut>) out_ptr = param_out->data_ptr<O>();
    run_adam<G, O>(param.data_ptr<float>(), grad.const_data_ptr<G>(),
                   exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), out_ptr,
                   param.numel(), c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zerofx, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }

}  // namespace zerofx
