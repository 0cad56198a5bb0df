// Shared device helpers for the alignkernels CUDA kernels: element conversion, 16-byte vector
// loads, row offsets, host-side launch helpers. The softmax math lives in softmax.cuh.
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

// The sampler's kept tokens of one row (support=, alignkernels/ops/_support.py): packed int32 words,
// token v kept when bit v % 32 (least significant first) of word v / 32 is set; null: all kept.
// mask() gives -inf outside the set, so the softmax sees p = 0 there (the renormalised distribution).
struct KeptSet {
  const int32_t* words;
  __device__ __forceinline__ float mask(float x, int64_t col) const {
    return (words == nullptr || ((words[col >> 5] >> (col & 31)) & 1) != 0) ? x : -INFINITY;
  }
};

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
