// Shared device helpers for the alignkernels CUDA kernels: dtype codes, 16-byte vector loads,
// the online (max, Σe^(z-m), Σz·e^(z-m)) state and its warp / block reductions, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "alignkernels_ops.h"

namespace alignkernels {

// ---------------------------------------------------------------------------------------------
// Element conversion (all arithmetic is fp32)
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// 16-byte packs: one LDG.128 / STG.128 moves 8 bf16/fp16 or 4 fp32 elements.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack16<T> load_pack(const T* aligned_ptr) {
  Pack16<T> pack;
  *reinterpret_cast<uint4*>(&pack) = __ldg(reinterpret_cast<const uint4*>(aligned_ptr));
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* aligned_ptr, const Pack16<T>& pack) {
  *reinterpret_cast<uint4*>(aligned_ptr) = *reinterpret_cast<const uint4*>(&pack);
}

// Number of leading elements of `ptr` before the first 16-byte boundary. Rows of a strided view
// (e.g. logits[:, :-1] with odd V) start anywhere; the head and the tail are done element by
// element and the aligned body with 16-byte packs.
template <typename T>
__device__ __forceinline__ int64_t misaligned_head(const void* ptr, int64_t n) {
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  const int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
  return head < n ? head : n;
}

// Row r of a [outer, inner, V] view: (r / rows_per_outer) * stride_outer + (r % rows_per_outer) * stride_inner.
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t rows_per_outer, int64_t stride_outer,
                                              int64_t stride_inner) {
  return (row / rows_per_outer) * stride_outer + (row % rows_per_outer) * stride_inner;
}

// ---------------------------------------------------------------------------------------------
// Online softmax statistics of z over a set of elements:
//   m = max z,  s = Σ e^(z - m),  t = Σ z · e^(z - m)
// so that lse = m + log s and Σ p·z = t / s (entropy H = lse - t / s).
// An empty set (or one holding only -inf) is m = -inf, s = t = 0; every update below keeps that
// state NaN-free (-inf - -inf never reaches an exp; 0 · -inf never reaches a sum).
// ---------------------------------------------------------------------------------------------
struct OnlineStats {
  float m;
  float s;
  float t;
};

__device__ __forceinline__ OnlineStats empty_stats() { return OnlineStats{-INFINITY, 0.f, 0.f}; }

// Adds N already-scaled values; one rescale exp for the whole group, one exp per element.
template <int N>
__device__ __forceinline__ void stats_add(OnlineStats& st, const float (&z)[N]) {
  float group_max = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) group_max = fmaxf(group_max, z[i]);
  const float m_new = fmaxf(st.m, group_max);
  if (m_new == -INFINITY) return;  // nothing but -inf so far: the empty state is exact
  const float alpha = __expf(st.m - m_new);  // st.m = -inf gives 0 (its s and t are 0 anyway)
  float s_add = 0.f, t_add = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = __expf(z[i] - m_new);
    s_add += e;
    t_add += e > 0.f ? e * z[i] : 0.f;  // z = -inf has e = 0: skip, do not add 0 * -inf
  }
  st.s = st.s * alpha + s_add;
  st.t = st.t * alpha + t_add;
  st.m = m_new;
}

__device__ __forceinline__ OnlineStats stats_merge(const OnlineStats& a, const OnlineStats& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return empty_stats();
  const float ca = __expf(a.m - m);
  const float cb = __expf(b.m - m);
  return OnlineStats{m, a.s * ca + b.s * cb, a.t * ca + b.t * cb};
}

// Butterfly over the WIDTH lanes of a row group inside one warp; every lane ends with the total.
template <int WIDTH>
__device__ __forceinline__ OnlineStats stats_warp_allreduce(OnlineStats st) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) {
    OnlineStats other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset, WIDTH);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset, WIDTH);
    other.t = __shfl_xor_sync(0xffffffffu, st.t, offset, WIDTH);
    st = stats_merge(st, other);
  }
  return st;
}

// Whole-block reduction (one row per block, THREADS a multiple of 32); the result is valid in
// thread 0 only. Must be reached by every thread of the block.
template <int THREADS>
__device__ __forceinline__ OnlineStats stats_block_reduce(OnlineStats st) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS must be a multiple of 32, at most 1024");
  constexpr int kWarps = THREADS / 32;
  __shared__ float shared_m[kWarps], shared_s[kWarps], shared_t[kWarps];
  st = stats_warp_allreduce<32>(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = st.m;
    shared_s[warp] = st.s;
    shared_t[warp] = st.t;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? OnlineStats{shared_m[lane], shared_s[lane], shared_t[lane]} : empty_stats();
    st = stats_warp_allreduce<32>(st);
  }
  return st;
}

// ---------------------------------------------------------------------------------------------
// Host-side helpers
// ---------------------------------------------------------------------------------------------
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("alignkernels._C: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the duration of a launch and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice (is a CUDA GPU and driver present?)");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline cudaStream_t as_stream(uint64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace alignkernels
