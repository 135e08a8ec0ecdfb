// Vector loads and stores for the CPU optimizer kernels: float, bf16 and fp16 arrays are read
// and written as float vectors, so one kernel body serves every gradient / copy dtype.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include "optim_common.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace zerofx {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = fVec::size();
// One loop step covers two float vectors: a bf16/fp16 vector has twice the lanes of a float one,
// so full-width reduced-precision loads and stores come in pairs of float vectors.
constexpr int64_t kStep = 2 * kWidth;
static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kStep, "bf16 lanes != 2x float");
static_assert(at::vec::Vectorized<c10::Half>::size() == kStep, "fp16 lanes != 2x float");

// Io<T>: load/store kStep elements of T as two float vectors. n < kStep only on a range's last
// step; the partial forms read zeros into (and write nothing from) the lanes past n.
template <typename T>
struct Io {
  using RVec = at::vec::Vectorized<T>;
  static void load(const T* p, int64_t n, fVec& a, fVec& b) {
    auto r = n == kStep ? RVec::loadu(p) : RVec::loadu(p, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(r);
  }
  static void store(T* p, int64_t n, const fVec& a, const fVec& b) {
    auto r = at::vec::convert_from_float<T>(a, b);
    if (n == kStep) {
      r.store(p);
    } else {
      r.store(p, n);
    }
  }
};

template <>
struct Io<float> {
  static void load(const float* p, int64_t n, fVec& a, fVec& b) {
    if (n == kStep) {
      a = fVec::loadu(p);
      b = fVec::loadu(p + kWidth);
    } else {
      a = fVec::loadu(p, std::min(n, kWidth));
      b = n > kWidth ? fVec::loadu(p + kWidth, n - kWidth) : fVec(0.f);
    }
  }
  static void store(float* p, int64_t n, const fVec& a, const fVec& b) {
    if (n == kStep) {
      a.store(p);
      b.store(p + kWidth);
    } else {
      a.store(p, std::min(n, kWidth));
      if (n > kWidth) b.store(p + kWidth, n - kWidth);
    }
  }
};

template <>
struct Io<NoOut> {
  static void store(NoOut*, int64_t, const fVec&, const fVec&) {}
};

// Zeroes lanes >= n of the pair (a, b): reductions must not see the padding lanes of a
// partial step (with eps = 0 they would hold 0/0).
inline void mask_tail(int64_t n, fVec& a, fVec& b) {
  if (n == kStep) return;
  a = fVec::set(fVec(0.f), a, std::min(n, kWidth));
  b = fVec::set(fVec(0.f), b, std::max<int64_t>(n - kWidth, 0));
}

// Calls body(i, n) for i = begin, begin + kStep, ... with n = min(kStep, end - i). Inside the
// loop n is the constant kStep, so the inlined body keeps only its full-width branch there.
template <typename F>
inline void for_each_step(int64_t begin, int64_t end, const F& body) {
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) body(i, kStep);
  if (i < end) body(i, end - i);
}

// p + i, or nullptr for the NoOut tag (no arithmetic on a null pointer).
template <typename T>
inline T* at_offset(T* p, int64_t i) {
  if constexpr (std::is_same_v<T, NoOut>) {
    return nullptr;
  } else {
    return p + i;
  }
}

inline float hsum(const fVec& a) {
  float lanes[kWidth];
  a.store(lanes);
  float s = 0.f;
  for (int64_t k = 0; k < kWidth; ++k) s += lanes[k];
  return s;
}

}  // namespace zerofx
