// Shared pieces of the CUDA optimizer kernels: per-step scalars as device pointers, launch
// sizes, element conversions, the tensor lookup of a flat offset and a block sum.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "optim_common.h"

namespace zerofx {

constexpr int kThreads = 256;

// A per-step value as a device float: the kernel reads it there, so the host never waits.
// (A no-op for the fp32 tensors on param's device that the step graph passes.)
inline at::Tensor device_scalar(const at::Tensor& t, const at::Tensor& param, const char* name) {
  check_scalar(t, name);
  return t.to(param.device(), at::kFloat).contiguous();
}

// The same, kept in float64 (beta1: the kernels compute with it in double).
inline at::Tensor device_scalar_f64(const at::Tensor& t, const at::Tensor& param,
                                    const char* name) {
  check_scalar(t, name);
  return t.to(param.device(), at::kDouble).contiguous();
}

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more.
inline unsigned int grid_blocks(int64_t n, const at::Tensor& param) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        param.device().index()));
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, sms * 8)));
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ void store_as(T* p, int64_t i, float x) {
  p[i] = static_cast<T>(x);
}

template <>
__device__ __forceinline__ void store_as<NoOut>(NoOut*, int64_t, float) {}

// Index t of the tensor holding flat offset x: bounds[t] <= x < bounds[t + 1]. Returns -1
// before the first tensor and num_tensors after the last (padding).
__device__ __forceinline__ int64_t tensor_of(const int64_t* bounds, int64_t num_tensors,
                                             int64_t x) {
  int64_t lo = 0, hi = num_tensors + 1;  // first bound > x, searched in [0, num_tensors + 1)
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (bounds[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// Sum of x over the block (kThreads threads), valid in thread 0. Every thread must call it.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return x;
}

// Device-side bias corrections (DeepSpeed computes them on the host from a Python int; here
// the step count is a device tensor so the step graph never syncs).
struct DeviceBiasCorrection {
  double bc1, bc2_sqrt;
};

__device__ __forceinline__ DeviceBiasCorrection device_bias_correction(bool enabled, double beta1,
                                                                       double beta2, float step) {
  if (!enabled) return {1.0, 1.0};
  return {1.0 - pow(beta1, static_cast<double>(step)),
          sqrt(1.0 - pow(beta2, static_cast<double>(step)))};
}

}  // namespace zerofx
