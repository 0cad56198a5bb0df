// Generalised advantage estimation as a parallel reverse scan (one block per sequence), with
// verl's masked recursion (alignkernels.reference.gae_reference; for right padding it equals
// TRL PPOTrainer's loop). From the end of each row, over positions with mask != 0 only:
//
//   delta_t   = r_t + gamma * V_next - V_t     V_next, A_next: value / advantage of the next
//   A_t       = delta_t + c * A_next           position with mask != 0 (0 past the end), c = gamma*lam
//   returns_t = A_t + V_t                      A_t = returns_t = 0 where mask == 0
//
// Masked positions (padding, tool-output holes) are skipped: the recursion bridges them.
// Both "next valid value" and A follow chains of affine maps x -> a + m·x applied right to left
// (valid t: V_next -> V_t is (V_t, 0), A -> delta_t + c·A is (delta_t, c); masked t: identity
// (0, 1)), and affine maps compose associatively: (a1, m1) ∘ (a2, m2) = (a1 + m1·a2, m1·m2).
// The row is walked in tiles of THREADS·ITEMS positions from the right end. Per tile: each thread
// composes the maps of its ITEMS consecutive positions, a block-wide reverse exclusive scan
// (warp shuffles, then the warp totals through shared memory) gives every thread the map of
// everything right of its chunk, applied to the carry from the previous tile. Done once for
// V_next (which yields each delta), once for A. The tile totals carry both into the next tile.
//
// Memory model: reads r, V, mask once and writes A and returns once (20 bytes per position);
// [B, T] is small next to the logits: this kernel exists so the PPO step never leaves the GPU
// or runs a T-step Python loop.

#include "common.cuh"

namespace alignkernels {
namespace {

constexpr int kGaeThreads = 128;
constexpr int kGaeItems = 8;
constexpr int kGaeWarps = kGaeThreads / 32;

struct Affine {  // x -> a + m·x
  float a;
  float m;
};

// f ∘ g: apply g (the maps to the right) first, then f.
__device__ __forceinline__ Affine compose(const Affine& f, const Affine& g) {
  return Affine{f.a + f.m * g.a, f.m * g.m};
}

__device__ __forceinline__ Affine identity_map() { return Affine{0.f, 1.f}; }

// Block-wide reverse scan of the per-thread maps (thread k holds the map of its chunk). Returns
// the composition of the maps of all threads right of this one (identity for the last thread),
// and the composition of all maps of the block in *total. Every thread must call it.
__device__ __forceinline__ Affine block_reverse_exclusive(Affine mine, Affine* warp_total, Affine* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Inclusive scan from the right inside the warp: lane k ends with f_k ∘ f_{k+1} ∘ ... ∘ f_31.
  Affine incl = mine;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Affine right;
    right.a = __shfl_down_sync(0xffffffffu, incl.a, offset);
    right.m = __shfl_down_sync(0xffffffffu, incl.m, offset);
    if (lane + offset < 32) incl = compose(incl, right);
  }
  if (lane == 0) warp_total[warp] = incl;
  __syncthreads();
  Affine right_of_warp = identity_map();  // all warps right of this one
  for (int w = kGaeWarps - 1; w > warp; --w) right_of_warp = compose(warp_total[w], right_of_warp);
  Affine block_total = identity_map();
  for (int w = kGaeWarps - 1; w >= 0; --w) block_total = compose(warp_total[w], block_total);
  __syncthreads();  // warp_total may be rewritten by the next call
  Affine excl;
  excl.a = __shfl_down_sync(0xffffffffu, incl.a, 1);
  excl.m = __shfl_down_sync(0xffffffffu, incl.m, 1);
  if (lane == 31) excl = identity_map();
  *total = block_total;
  return compose(excl, right_of_warp);
}

__global__ void __launch_bounds__(kGaeThreads)
    gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const float* __restrict__ mask,
               float* __restrict__ advantages, float* __restrict__ returns, int64_t T, float gamma, float lam) {
  __shared__ Affine warp_total[kGaeWarps];
  const int64_t row_start = int64_t(blockIdx.x) * T;
  const float* r = rewards + row_start;
  const float* v = values + row_start;
  const float* m = mask + row_start;
  float* adv = advantages + row_start;
  float* ret = returns + row_start;
  const float c = gamma * lam;
  constexpr int64_t kTile = int64_t(kGaeThreads) * kGaeItems;

  float carry_value = 0.f;  // V_next seen from the tile's right edge (0 past the end)
  float carry_adv = 0.f;    // A_next seen from the tile's right edge
  for (int64_t tile_start = ((T - 1) / kTile) * kTile; tile_start >= 0; tile_start -= kTile) {
    const int64_t chunk = tile_start + int64_t(threadIdx.x) * kGaeItems;
    float reward[kGaeItems], value[kGaeItems], delta[kGaeItems];
    bool valid[kGaeItems];
    Affine value_map = identity_map();
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      const int64_t t = chunk + j;
      valid[j] = t < T && m[t] != 0.f;  // positions past T act as masked (identity)
      reward[j] = valid[j] ? r[t] : 0.f;
      value[j] = valid[j] ? v[t] : 0.f;
    }
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      if (valid[j]) value_map = Affine{value[j], 0.f};  // (V_t, 0) ∘ anything = (V_t, 0)
    }
    Affine total;
    const Affine value_right = block_reverse_exclusive(value_map, warp_total, &total);
    float next_value = value_right.a + value_right.m * carry_value;
    carry_value = total.a + total.m * carry_value;

    Affine adv_map = identity_map();
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      delta[j] = 0.f;
      if (valid[j]) {
        delta[j] = reward[j] + gamma * next_value - value[j];
        next_value = value[j];
        adv_map = Affine{delta[j] + c * adv_map.a, c * adv_map.m};  // (delta_j, c) ∘ adv_map
      }
    }
    const Affine adv_right = block_reverse_exclusive(adv_map, warp_total, &total);
    float a = adv_right.a + adv_right.m * carry_adv;  // A_next at this chunk's right edge
    carry_adv = total.a + total.m * carry_adv;
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      const int64_t t = chunk + j;
      if (t >= T) continue;
      if (valid[j]) {
        a = delta[j] + c * a;
        adv[t] = a;
        ret[t] = a + value[j];
      } else {
        adv[t] = 0.f;
        ret[t] = 0.f;
      }
    }
  }
}

}  // namespace

void gae(uint64_t rewards, uint64_t values, uint64_t mask, uint64_t advantages, uint64_t returns, int64_t batch,
         int64_t seq_len, double gamma, double lam, int device, uint64_t stream) {
  if (batch < 0 || seq_len < 0) throw std::invalid_argument("alignkernels._C.gae: negative size");
  if (batch == 0 || seq_len == 0) return;
  if (batch > 0x7fffffffLL) throw std::invalid_argument("alignkernels._C.gae: batch too large");
  DeviceGuard guard(device);
  gae_kernel<<<static_cast<unsigned>(batch), kGaeThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(rewards), reinterpret_cast<const float*>(values),
      reinterpret_cast<const float*>(mask), reinterpret_cast<float*>(advantages), reinterpret_cast<float*>(returns),
      seq_len, static_cast<float>(gamma), static_cast<float>(lam));
  check_cuda(cudaGetLastError(), "gae launch");
}

}  // namespace alignkernels
