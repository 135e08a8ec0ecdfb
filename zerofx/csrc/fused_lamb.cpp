// zerofx::lamb_moments_ and zerofx::lamb_apply_ on CPU: DeepSpeed's FusedLamb split in two
// passes so that a ZeRO shard can combine per-tensor norms across ranks between them.
//
//   lamb_moments_: scale the gradient, update both moments, return per-tensor partial sums
//                  [sum w^2, sum u^2] of the weight and of the update direction
//                  u = m / denom + weight_decay * w over this shard's piece of each tensor.
//   (caller)       all-reduce the sums, trust ratio = clamp(|w| / |u|) per tensor.
//   lamb_apply_:   recompute u from the stored moments and write w -= step_size * ratio * u.
//
// Recomputing u in the second pass, like DeepSpeed's kernel, moves as many bytes as storing it
// in the first pass and reading it back, and needs no shard-sized scratch buffer.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "optim_common.h"
#include "vec_io.h"

namespace zerofx {
namespace {

// Elements per work piece: few enough float additions per lane that the fp32 lane sums of
// the norms stay accurate (pieces are then summed in double, in a fixed order).
constexpr int64_t kPiece = 8192;

struct Piece {
  int64_t tensor;      // index into tensor_bounds
  int64_t begin, end;  // offsets into the shard
};

// Cuts the shard [offset, offset + n) of the flat buffer into pieces of at most kPiece
// elements, each inside one tensor. Elements outside every tensor (padding) get no piece.
std::vector<Piece> shard_pieces(const at::Tensor& bounds, int64_t offset, int64_t n) {
  TORCH_CHECK(bounds.dim() == 1 && bounds.numel() >= 1 && bounds.scalar_type() == at::kLong,
              "tensor_bounds must be a 1-d int64 tensor of tensor start offsets plus the end");
  TORCH_CHECK(bounds.device().is_cpu(), "tensor_bounds must be on the CPU for the CPU kernel");
  const at::Tensor b = bounds.contiguous();
  const int64_t* bp = b.const_data_ptr<int64_t>();
  const int64_t num_tensors = b.numel() - 1;
  std::vector<Piece> pieces;
  pieces.reserve(n / kPiece + num_tensors + 1);
  for (int64_t t = 0; t < num_tensors; ++t) {
    TORCH_CHECK(bp[t] <= bp[t + 1], "tensor_bounds must be non-decreasing");
    const int64_t lo = std::max(bp[t], offset), hi = std::min(bp[t + 1], offset + n);
    for (int64_t s = lo; s < hi; s += kPiece) {
      pieces.push_back({t, s - offset, std::min(s + kPiece, hi) - offset});
    }
  }
  return pieces;
}

struct LambConsts {
  fVec grad_scale, beta1, omb1, beta2, omb2, eps, weight_decay;
  bool eps_inside_sqrt;
};

LambConsts lamb_consts(double grad_scale, double beta1, double beta2, double eps,
                       double weight_decay, bool eps_inside_sqrt) {
  LambConsts c;
  c.grad_scale = fVec(static_cast<float>(grad_scale));
  c.beta1 = fVec(static_cast<float>(beta1));
  c.omb1 = fVec(static_cast<float>(1.0 - beta1));
  c.beta2 = fVec(static_cast<float>(beta2));
  c.omb2 = fVec(static_cast<float>(1.0 - beta2));
  c.eps = fVec(static_cast<float>(eps));
  c.weight_decay = fVec(static_cast<float>(weight_decay));
  c.eps_inside_sqrt = eps_inside_sqrt;
  return c;
}

// DeepSpeed's update direction from the already-updated moments.
C10_ALWAYS_INLINE fVec lamb_direction(const LambConsts& c, const fVec& p, const fVec& m,
                                      const fVec& v) {
  const fVec denom = c.eps_inside_sqrt ? (v + c.eps).sqrt() : v.sqrt() + c.eps;
  return m / denom + c.weight_decay * p;
}

C10_ALWAYS_INLINE void lamb_moments_vec(const LambConsts& c, fVec g, fVec& m, fVec& v) {
  g = g * c.grad_scale;
  m = c.beta1 * m + c.omb1 * g;
  v = c.beta2 * v + c.omb2 * g * g;
}

struct Shard {
  float* p;
  float* m;
  float* v;
};

// Updates the moments over one piece; returns its {sum w^2, sum u^2}.
template <typename G>
std::pair<double, double> moments_piece(const Shard& s, const G* g, const Piece& pc,
                                        const LambConsts& cs) {
  const LambConsts c = cs;  // a local copy: the stores below cannot alias it
  fVec w0(0.f), w1(0.f), u0(0.f), u1(0.f);
  for_each_step(pc.begin, pc.end, [&](int64_t i, int64_t k) {
    fVec p0, p1, g0, g1, m0, m1, v0, v1;
    Io<float>::load(s.p + i, k, p0, p1);
    Io<G>::load(g + i, k, g0, g1);
    Io<float>::load(s.m + i, k, m0, m1);
    Io<float>::load(s.v + i, k, v0, v1);
    lamb_moments_vec(c, g0, m0, v0);
    lamb_moments_vec(c, g1, m1, v1);
    Io<float>::store(s.m + i, k, m0, m1);
    Io<float>::store(s.v + i, k, v0, v1);
    fVec d0 = lamb_direction(c, p0, m0, v0), d1 = lamb_direction(c, p1, m1, v1);
    mask_tail(k, d0, d1);  // p's padding lanes load as 0 already
    w0 = w0 + p0 * p0;
    w1 = w1 + p1 * p1;
    u0 = u0 + d0 * d0;
    u1 = u1 + d1 * d1;
  });
  return {hsum(w0 + w1), hsum(u0 + u1)};
}

at::Tensor lamb_moments_cpu(const at::Tensor& param, const at::Tensor& grad,
                            const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& tensor_bounds, const at::Tensor& grad_scale,
                            const at::Tensor& skip, int64_t shard_offset,
                            const at::Tensor& beta1_t, double beta2, double eps,
                            double weight_decay, bool eps_inside_sqrt) {
  const double beta1 = host_scalar(beta1_t, "beta1");
  check_state(param, param, "param");
  check_same_shape(grad, param, "grad");
  check_state(exp_avg, param, "exp_avg");
  check_state(exp_avg_sq, param, "exp_avg_sq");
  const std::vector<Piece> pieces = shard_pieces(tensor_bounds, shard_offset, param.numel());
  at::Tensor sums = at::zeros({2, tensor_bounds.numel() - 1}, param.options());
  if (host_scalar(skip, "skip") != 0.0) return sums;  // overflow: moments untouched
  const LambConsts c = lamb_consts(host_scalar(grad_scale, "grad_scale"), beta1, beta2, eps,
                                   weight_decay, eps_inside_sqrt);
  const Shard s{param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>()};
  std::vector<std::pair<double, double>> partial(pieces.size());
  dispatch_grad_out(grad.scalar_type(), std::nullopt, [&](auto g_tag, auto) {
    using G = typename decltype(g_tag)::type;
    const G* g = grad.const_data_ptr<G>();
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t a, int64_t b) {
      for (int64_t k = a; k < b; ++k) partial[k] = moments_piece<G>(s, g, pieces[k], c);
    });
  });
  // Summed serially in piece order: the result does not depend on the thread count.
  std::vector<double> w2(sums.size(1), 0.0), u2(sums.size(1), 0.0);
  for (size_t k = 0; k < pieces.size(); ++k) {
    w2[pieces[k].tensor] += partial[k].first;
    u2[pieces[k].tensor] += partial[k].second;
  }
  float* out = sums.data_ptr<float>();
  for (int64_t t = 0; t < sums.size(1); ++t) {
    out[t] = static_cast<float>(w2[t]);
    out[sums.size(1) + t] = static_cast<float>(u2[t]);
  }
  return sums;
}

template <typename O>
void apply_piece(const Shard& s, O* out, const Piece& pc, const LambConsts& cs, float scale) {
  const LambConsts c = cs;  // a local copy: the stores below cannot alias it
  const fVec neg_scale(-scale);
  for_each_step(pc.begin, pc.end, [&](int64_t i, int64_t k) {
    fVec p0, p1, m0, m1, v0, v1;
    Io<float>::load(s.p + i, k, p0, p1);
    Io<float>::load(s.m + i, k, m0, m1);
    Io<float>::load(s.v + i, k, v0, v1);
    p0 = p0 + neg_scale * lamb_direction(c, p0, m0, v0);
    p1 = p1 + neg_scale * lamb_direction(c, p1, m1, v1);
    Io<float>::store(s.p + i, k, p0, p1);
    Io<O>::store(at_offset(out, i), k, p0, p1);
  });
}

// DeepSpeed's LAMB step size: the bias corrections scale the whole update, decay included.
double lamb_step_size(double lr, double step, double beta1, double beta2, bool bias_correction) {
  const BiasCorrection bc = zerofx::bias_correction(bias_correction, beta1, beta2, step);
  return lr * bc.bc2_sqrt / bc.bc1;
}

void lamb_apply_cpu(const at::Tensor& param, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_out,
                    const at::Tensor& tensor_bounds, const at::Tensor& trust_ratio,
                    const at::Tensor& lr, const at::Tensor& step, const at::Tensor& skip,
                    int64_t shard_offset, const at::Tensor& beta1_t, double beta2, double eps,
                    double weight_decay, bool bias_correction, bool eps_inside_sqrt) {
  const auto out = check_update_state(param, exp_avg, exp_avg_sq, param_out);
  const double beta1 = host_scalar(beta1_t, "beta1");
  const std::vector<Piece> pieces = shard_pieces(tensor_bounds, shard_offset, param.numel());
  TORCH_CHECK(trust_ratio.numel() == tensor_bounds.numel() - 1 &&
                  trust_ratio.scalar_type() == at::kFloat && trust_ratio.device().is_cpu(),
              "trust_ratio must be a float32 CPU tensor with one entry per tensor");
  if (host_scalar(skip, "skip") != 0.0) return;
  const double step_size = lamb_step_size(host_scalar(lr, "lr"), host_scalar(step, "step"),
                                          beta1, beta2, bias_correction);
  const LambConsts c = lamb_consts(1.0, beta1, beta2, eps, weight_decay, eps_inside_sqrt);
  const at::Tensor ratio = trust_ratio.contiguous();
  const float* rp = ratio.const_data_ptr<float>();
  const Shard s{param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>()};
  dispatch_grad_out(at::kFloat, out, [&](auto, auto o_tag) {
    using O = typename decltype(o_tag)::type;
    O* o = nullptr;
    if constexpr (!std::is_same_v<O, NoOut>) o = param_out->data_ptr<O>();
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t a, int64_t b) {
      for (int64_t k = a; k < b; ++k) {
        const float scale = static_cast<float>(step_size * rp[pieces[k].tensor]);
        apply_piece<O>(s, o, pieces[k], c, scale);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(zerofx, CPU, m) {
  m.impl("lamb_moments_", &lamb_moments_cpu);
  m.impl("lamb_apply_", &lamb_apply_cpu);
}

}  // namespace zerofx
