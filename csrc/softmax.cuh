// The softmax math of every CUDA kernel, once: the centred online statistics of a row, their
// warp / block reductions, the finalisation into the saved per-row state, and the gradient.
//
// Centred online statistics of z over a set of elements (m = running max):
//   m = max z,   s = Σ e^(z−m),   t = Σ (z−m)·e^(z−m)
// Every sum is taken relative to the running max, so no term carries |z| itself: at |z| ≫ 1
// (offset logits, low temperature) Σz·e^(z−m) would hold z ≈ 1e4 next to a spread of ~1 and lose
// the entropy's digits; (z−m) stays the size of that spread.
// Moving to a larger max m' (α = e^(m−m')):
//   s' = α·s,   t' = Σ (z−m')·e^(z−m') = α·Σ ((z−m) + (m−m'))·e^(z−m) = α·(t + (m−m')·s).
// Finalisation (the per-row state every backend saves; docs/ARCHITECTURE.md, "The numerical core"):
//   row_max = m,   log_sum = log s,   Σp·(z−m) = t/s,   entropy H = log_sum − t/s,
//   logsumexp = row_max + log_sum,   log p(label) = (z_label − row_max) − log_sum.
// The temperature is fused: z = x·(1/T), and each centred offset z − m is formed from the logit x
// as one fused multiply-add, d = fma(x, 1/T, −m), rounded once. m itself is the fp32 number
// fl(x_max/T); the exact residue x_max/T − m is a per-row constant inside every d, which cancels
// in p, logp, Σp·(z−m) and H (log_sum absorbs it), so at T = 0.01 with logits near 1e4 (z ≈ 1e6,
// fp32 spacing 0.06) the outputs still carry fp32 precision relative to the spread of the row,
// where rounding z = x/T first would not. Forward and backward form d with the same expression.
// An empty set (or one holding only −inf) is m = −inf, s = t = 0; every update keeps that state
// NaN-free: −inf − −inf never reaches an exp, 0·−inf never reaches a sum.
// A whole row with no mass (every logit −inf: a support= row with no kept token, common.cuh KeptSet)
// has no distribution; its limit, as in alignkernels/ops/_softmax_torch.py: log_sum = −inf, H = 0
// (finalize), log p = −inf (log_prob), a gradient of exactly 0, the label's column included (SoftmaxGrad).
#pragma once

#include "common.cuh"

namespace alignkernels {

struct OnlineStats {
  float m;  // running max
  float s;  // Σ e^(z−m)
  float t;  // Σ (z−m)·e^(z−m)
};

__device__ __forceinline__ OnlineStats empty_stats() { return OnlineStats{-INFINITY, 0.f, 0.f}; }

// The state re-centred on a max m_new >= st.m: (α·s, α·(t + (m−m_new)·s)); an empty state stays empty.
__device__ __forceinline__ OnlineStats stats_recentre(const OnlineStats& st, float m_new) {
  if (!(st.s > 0.f)) return OnlineStats{m_new, 0.f, 0.f};
  const float alpha = __expf(st.m - m_new);
  return OnlineStats{m_new, st.s * alpha, alpha * (st.t + (st.m - m_new) * st.s)};
}

// z − c for a logit x and a centre c (an fp32 value of z), rounded once (see the top).
__device__ __forceinline__ float centred(float x, float inv_temperature, float c) {
  return fmaf(x, inv_temperature, -c);
}

// Adds N logits x (z = x·inv_temperature): one rescale for the group, one exp per element.
template <int N>
__device__ __forceinline__ void stats_add(OnlineStats& st, const float (&x)[N], float inv_temperature) {
  float group_max = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) group_max = fmaxf(group_max, x[i]);
  const float m_new = fmaxf(st.m, group_max * inv_temperature);  // T > 0: max z is at max x
  if (m_new == -INFINITY) return;  // nothing but -inf so far: the empty state is exact
  OnlineStats out = stats_recentre(st, m_new);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = centred(x[i], inv_temperature, m_new);  // <= ~0; -inf for a masked logit
    const float e = __expf(d);
    out.s += e;
    out.t += e > 0.f ? e * d : 0.f;  // z = -inf has e = 0: skip, do not add 0 * -inf
  }
  st = out;
}

__device__ __forceinline__ OnlineStats stats_merge(const OnlineStats& a, const OnlineStats& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return empty_stats();
  const OnlineStats ra = stats_recentre(a, m), rb = stats_recentre(b, m);
  return OnlineStats{m, ra.s + rb.s, ra.t + rb.t};
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

// The saved per-row state (RowStats in alignkernels/ops/_softmax_torch.py): logsumexp = row_max + log_sum.
struct RowSoftmax {
  float row_max;
  float log_sum;  // log Σ e^(z − row_max)
  float entropy;  // log_sum − Σp·(z − row_max)
};

// logp <= 0 and H >= 0 hold exactly: the roundings of exp/log can put either one ulp on the wrong side
// of 0 in a peaked row (p_label ≈ 1), so both are clamped where they are formed; moving them towards the
// true value never adds error. Written as selects, not fmaxf/fminf (those drop a NaN): NaN stays NaN.
__device__ __forceinline__ RowSoftmax finalize(const OnlineStats& st) {
  const float log_sum = logf(st.s);
  const float entropy = st.s == 0.f ? 0.f : log_sum - st.t / st.s;  // no mass: H = 0 (log_sum = -inf)
  return RowSoftmax{st.m, log_sum, entropy < 0.f ? 0.f : entropy};
}

// log p(label) relative to the max: (z_label − row_max) − log_sum, for the label's logit x; at most 0.
__device__ __forceinline__ float log_prob(const RowSoftmax& row, float x, float inv_temperature) {
  if (row.log_sum == -INFINITY) return -INFINITY;  // no mass (row_max = -inf): never (-inf) - (-inf)
  const float logp = centred(x, inv_temperature, row.row_max) - row.log_sum;
  return logp > 0.f ? 0.f : logp;
}

// Gradient of g_logp·log p(label) + g_H·H w.r.t. the logits x (z = x / T):
//   d log p(label) / dz_i = onehot_i − p_i
//   d H / dz_i            = −p_i (z_i − Σp·z)
//   dz_i = g_logp (onehot_i − p_i) − g_H p_i (z_i − Σp·z),        d x_i = dz_i / T
// with p_i = e^((z_i − row_max) − log_sum) and z_i − Σp·z = (z_i − row_max) − (log_sum − H):
// both formed from the centred pair, never from one fp32 logsumexp (digits lost at |z| ≫ 1).
struct SoftmaxGrad {
  float row_max, log_sum;
  float centred_mean;  // Σp·(z − row_max) = log_sum − H
  float g_logp, g_entropy, inv_temperature;
  int64_t label;

  __device__ __forceinline__ SoftmaxGrad(const RowSoftmax& row, float g_logp_, float g_entropy_, float inv_t,
                                         int64_t label_)
      : row_max(row.row_max), log_sum(row.log_sum), centred_mean(row.log_sum - row.entropy),
        // no mass (log_sum = -inf): every p is NaN or 0 and skipped in grad(), and no one-hot either
        g_logp(row.log_sum == -INFINITY ? 0.f : g_logp_), g_entropy(g_entropy_), inv_temperature(inv_t),
        label(label_) {}

  __device__ __forceinline__ float grad(float x, int64_t col) const {
    const float d = centred(x, inv_temperature, row_max);  // z_i − row_max
    const float p = __expf(d - log_sum);
    // p = 0 (a -inf logit, or far below the max) contributes nothing: skip 0 · -inf.
    float dz = p > 0.f ? -p * (g_logp + g_entropy * (d - centred_mean)) : 0.f;
    if (col == label) dz += g_logp;
    return dz * inv_temperature;
  }
};

}  // namespace alignkernels
