// Probe kernels for the emulator's own tests: each exercises one rule of the CUDA execution model
// (CUDA semantics are the spec; a GPU would behave the same or, for the error cases, be undefined).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

unsigned g_block_counter = 0;  // blocks run one at a time: a plain counter records their order

__global__ void shuffle_rules(int* out) {
  const int lane = threadIdx.x % 32;
  const int w = threadIdx.x / 32;
  int* o = out + w * 32 * 6 + lane * 6;
  o[0] = __shfl_xor_sync(0xffffffffu, lane, 3, 8);     // butterfly inside segments of 8
  o[1] = __shfl_down_sync(0xffffffffu, lane, 5, 16);   // past the segment end: own value
  o[2] = __shfl_up_sync(0xffffffffu, lane, 2, 4);      // before the segment start: own value
  o[3] = __shfl_sync(0xffffffffu, lane * 10, 33, 16);  // srcLane 33 % 16 = 1 within the segment
  o[4] = int(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __all_sync(0xffffffffu, lane < 32) + 2 * __any_sync(0xffffffffu, lane == 7);
}

__global__ void exited_lane(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 20);
}

__global__ void different_intrinsics(int* out) {
  const int v = int(threadIdx.x);
  out[threadIdx.x] = threadIdx.x % 2 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 1);
}

__global__ void barrier_vs_shuffle(int* out) {
  if (threadIdx.x == 40) __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void two_barriers(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_barrier(int* out) {
  // Threads that exited do not hold a barrier (sm_70+ semantics): this completes.
  if (threadIdx.x >= 40) return;
  __shared__ int buf[64];
  buf[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[39 - threadIdx.x];
}

__global__ void shared_per_block(float* out) {
  __shared__ float buf[4];
  if (threadIdx.x == 0) out[blockIdx.x * 2] = buf[1];  // before any write of this block: poison
  __syncthreads();
  if (threadIdx.x == 1) buf[1] = float(blockIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x * 2 + 1] = buf[1];
}

__global__ void __launch_bounds__(64) bounded(int* out) { out[threadIdx.x] = 1; }

__global__ void read_past_end(int* out) { out[threadIdx.x] = out[threadIdx.x + 1]; }

__global__ void block_order(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x + gridDim.x * blockIdx.y] = int(g_block_counter++);
}

void check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err));
}

}  // namespace

void probe_run(const std::string& name, uint64_t out, unsigned blocks, unsigned threads) {
  int* i = reinterpret_cast<int*>(out);
  g_block_counter = 0;
  if (name == "shuffle_rules") shuffle_rules<<<blocks, threads>>>(i);
  else if (name == "exited_lane") exited_lane<<<blocks, threads>>>(i);
  else if (name == "outside_mask") outside_mask<<<blocks, threads>>>(i);
  else if (name == "different_intrinsics") different_intrinsics<<<blocks, threads>>>(i);
  else if (name == "barrier_vs_shuffle") barrier_vs_shuffle<<<blocks, threads>>>(i);
  else if (name == "two_barriers") two_barriers<<<blocks, threads>>>(i);
  else if (name == "early_exit_barrier") early_exit_barrier<<<blocks, threads>>>(i);
  else if (name == "shared_per_block") shared_per_block<<<blocks, threads>>>(reinterpret_cast<float*>(out));
  else if (name == "bounded") bounded<<<blocks, threads>>>(i);
  else if (name == "read_past_end") read_past_end<<<blocks, threads>>>(i);
  else if (name == "block_order") block_order<<<dim3(blocks, 2), threads>>>(i);
  else throw std::invalid_argument("no probe " + name);
  check(name.c_str());
}
