// cuemu: force-included (g++ -include cuemu.h) into every csrc/*.cu compiled as host C++.
//
// NVIDIA's own host headers come first (so __half / __nv_bfloat16 and their conversions are the
// CUDA 13 ones: without __CUDACC__, crt/host_defines.h defines __global__ / __device__ /
// __shared__ / __forceinline__ for the host and declares no device function). Then this header
// supplies what a GPU would: the built-in indices (one value per emulated thread, read through a
// thread-local context), __syncthreads, the warp intrinsics with CUDA's mask / width / segment
// rules, __ldg, __expf, and the launch operator that the rewritten `K<<<cfg>>>(args)` uses.
// Execution semantics live in runtime.cpp; see tests/cuemu/__init__.py for the model.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuemu {

struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The context of the calling emulated CUDA thread (aborts the kernel if called outside one).
const ThreadContext& this_thread();

void syncthreads(const char* file, int line);

// __launch_bounds__(max_threads), checked at the top of the kernel body (rewrite).
void check_launch_bounds(long long max_threads, const char* file, int line);

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };

// One warp collective: every lane named in `mask` must arrive with the same op, mask and width;
// returns this lane's result bits (the source lane's value for shuffles, the vote otherwise).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int size, int param, int width,
                         const char* file, int line);

// __shared__ storage is one static copy, used by one block at a time (blocks run one after
// another); the first thread of each block to reach the declaration fills it with 0xff bytes
// (NaN for floats) so a read before any write of this block shows.
void shared_block_init(void* storage, size_t bytes);

// ---- launch: `K<<<grid, block, smem, stream>>>(args)` is rewritten to
//      `K ->* ::cuemu::LaunchConfig(grid, block, smem, stream)(args)`
struct LaunchSite {
  const char* file;
  int line;
};

struct LaunchConfig;

template <class... A>
struct PendingLaunch {
  const LaunchConfig* config;
  std::tuple<A...> args;
};

void launch_grid(const LaunchConfig& config, void (*run)(void*), void* closure);

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
  LaunchSite site;
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = 0, const char* file = __builtin_FILE(),
               int line = __builtin_LINE())
      : grid(g), block(b), shared_bytes(smem), stream(s), site{file, line} {}
  template <class... A>
  PendingLaunch<std::decay_t<A>...> operator()(A&&... args) const {
    return PendingLaunch<std::decay_t<A>...>{this, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
  }
};

template <class... P>
struct BoundKernel {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> params;
  static void run(void* self) {
    auto* k = static_cast<const BoundKernel*>(self);
    std::tuple<std::decay_t<P>...> copy = k->params;  // each CUDA thread gets its own parameters
    std::apply(k->kernel, copy);
  }
};

template <class... P, class... A>
void operator->*(void (*kernel)(P...), PendingLaunch<A...>&& pending) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // Arguments convert to the kernel's parameter types, as in a CUDA launch.
  BoundKernel<P...> bound{kernel, std::apply([](auto&... a) { return std::tuple<std::decay_t<P>...>(a...); },
                                             pending.args)};
  launch_grid(*pending.config, &BoundKernel<P...>::run, &bound);
}

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp intrinsic on an 8-byte+ type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuemu

// ---- built-in variables
#define threadIdx (::cuemu::this_thread().thread_idx)
#define blockIdx (::cuemu::this_thread().block_idx)
#define blockDim (::cuemu::this_thread().block_dim)
#define gridDim (::cuemu::this_thread().grid_dim)
#define warpSize 32

#define __syncthreads() ::cuemu::syncthreads(__FILE__, __LINE__)

// ---- warp intrinsics (file / line of the caller name the failing call in errors)
#define CUEMU_SITE const char *cuemu_file = __builtin_FILE(), int cuemu_line = __builtin_LINE()

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::WarpOp::kShflIdx, mask, ::cuemu::to_bits(var),
                                                        sizeof(T), src_lane, width, cuemu_file, cuemu_line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::WarpOp::kShflUp, mask, ::cuemu::to_bits(var),
                                                        sizeof(T), int(delta), width, cuemu_file, cuemu_line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::WarpOp::kShflDown, mask, ::cuemu::to_bits(var),
                                                        sizeof(T), int(delta), width, cuemu_file, cuemu_line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::WarpOp::kShflXor, mask, ::cuemu::to_bits(var),
                                                        sizeof(T), lane_mask, width, cuemu_file, cuemu_line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, CUEMU_SITE) {
  return unsigned(::cuemu::warp_collective(::cuemu::WarpOp::kBallot, mask, predicate != 0, 4, 0, 32, cuemu_file,
                                           cuemu_line));
}
inline int __any_sync(unsigned mask, int predicate, CUEMU_SITE) {
  return int(::cuemu::warp_collective(::cuemu::WarpOp::kAny, mask, predicate != 0, 4, 0, 32, cuemu_file,
                                      cuemu_line));
}
inline int __all_sync(unsigned mask, int predicate, CUEMU_SITE) {
  return int(::cuemu::warp_collective(::cuemu::WarpOp::kAll, mask, predicate != 0, 4, 0, 32, cuemu_file,
                                      cuemu_line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, CUEMU_SITE) {
  ::cuemu::warp_collective(::cuemu::WarpOp::kSyncwarp, mask, 0, 4, 0, 32, cuemu_file, cuemu_line);
}

// ---- loads and fast math (host semantics: __expf is exact expf here; see csrc/README.md)
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
