// token_logprobs forward and backward: log p(label) and entropy of softmax(logits / T) per row,
// and the gradient w.r.t. the logits, without ever writing a softmax.
//
// Memory model: bandwidth-bound, like the Triton kernels in kernels/token_logprobs.py (same
// numbers, same contract). Forward reads each logit of a non-ignored row once (N·V·b bytes) and
// writes 16 bytes per row (logp, row_max, log_sum, entropy); backward reads each logit once and writes its gradient once. Ignored
// rows are not read at all (backward only writes their zero gradient). Per element: one exp.
//
// Work split: a group of THREADS_PER_ROW threads owns one row: a warp (4 rows per 128-thread
// block) for V <= 2048, a whole block of 256 or 512 threads beyond. Each thread walks its
// strided share of the row with 16-byte loads (UNROLL packs in flight), keeping the centred
// online state (m, s, t) of softmax.cuh; the group then merges the states by shuffles (+ shared memory
// across warps). Offsets are int64 throughout (N·V passes 2^31 at 16k tokens x 152k vocab).
//
// The sampler's kept set (support=): with a non-null `support` ([n_rows, ceil(V/32)] int32 words, row
// stride support_stride) every logit outside the row's set is read as -inf (common.cuh KeptSet), in
// the forward's statistics, at the label and in the backward: logp, entropy and gradient of the
// distribution renormalised over the kept tokens (V/8 extra bytes read per row).

#include "softmax.cuh"

namespace alignkernels {
namespace {

constexpr int kUnroll = 2;  // 16-byte packs loaded per thread before they are consumed

// Labels are int32 or int64, chosen at run time (one branch per row, not another template
// dimension: half the kernels to compile).
__device__ __forceinline__ int64_t load_label(const void* labels, bool labels_int64, int64_t row) {
  return labels_int64 ? static_cast<const int64_t*>(labels)[row]
                      : static_cast<int64_t>(static_cast<const int32_t*>(labels)[row]);
}

// Partial online stats of one thread over its share of row[0, V): lanes `lane`, `lane + GROUP`, ...
template <typename T, int GROUP>
__device__ __forceinline__ OnlineStats row_stats_partial(const T* row, int64_t V, float inv_temperature,
                                                         int lane, KeptSet kept) {
  constexpr int kVec = Pack16<T>::kSize;
  OnlineStats st = empty_stats();
  const int64_t head = misaligned_head<T>(row, V);
  const int64_t n_packs = (V - head) / kVec;
  const int64_t tail_start = head + n_packs * kVec;
  // Unaligned head and ragged tail (< kVec elements each), element by element.
  for (int64_t i = lane; i < head; i += GROUP) {
    const float x[1] = {kept.mask(to_float(row[i]), i)};
    stats_add(st, x, inv_temperature);
  }
  for (int64_t i = tail_start + lane; i < V; i += GROUP) {
    const float x[1] = {kept.mask(to_float(row[i]), i)};
    stats_add(st, x, inv_temperature);
  }
  const T* body = row + head;  // 16-byte aligned
  for (int64_t p0 = lane; p0 < n_packs; p0 += int64_t(GROUP) * kUnroll) {
    Pack16<T> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + int64_t(u) * GROUP;
      if (p < n_packs) packs[u] = load_pack(body + p * kVec);
    }
    float x[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in_row = p0 + int64_t(u) * GROUP < n_packs;
      const int64_t col0 = head + (p0 + int64_t(u) * GROUP) * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        x[u * kVec + k] = in_row ? kept.mask(to_float(packs[u].v[k]), col0 + k) : -INFINITY;
      }
    }
    stats_add(st, x, inv_temperature);
  }
  return st;
}

template <typename T, int THREADS_PER_ROW, int ROWS_PER_BLOCK>
__global__ void __launch_bounds__(THREADS_PER_ROW* ROWS_PER_BLOCK)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, const void* __restrict__ labels, bool labels_int64,
                              float* __restrict__ logp, float* __restrict__ row_max_out,
                              float* __restrict__ log_sum_out, float* __restrict__ entropy_out,
                              const int32_t* __restrict__ support, int64_t support_stride, int64_t n_rows,
                              int64_t V, int64_t rows_per_outer, int64_t stride_outer, int64_t stride_inner,
                              float inv_temperature, int64_t ignore_index) {
  static_assert(ROWS_PER_BLOCK == 1 || THREADS_PER_ROW == 32, "several rows per block means one warp per row");
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / THREADS_PER_ROW;
  const int lane = threadIdx.x % THREADS_PER_ROW;
  if (row >= n_rows) return;  // whole warps (warp per row) or the whole block (block per row)
  const int64_t label = load_label(labels, labels_int64, row);
  if (label == ignore_index) {
    // Ignored rows (prompt, padding) skip the vocabulary walk entirely: zero bytes read.
    if (lane == 0) {
      logp[row] = 0.f;
      row_max_out[row] = 0.f;
      log_sum_out[row] = 0.f;
      entropy_out[row] = 0.f;
    }
    return;
  }
  const T* row_ptr = logits + row_offset(row, rows_per_outer, stride_outer, stride_inner);
  const KeptSet kept{support != nullptr ? support + row * support_stride : nullptr};
  OnlineStats st = row_stats_partial<T, THREADS_PER_ROW>(row_ptr, V, inv_temperature, lane, kept);
  if constexpr (THREADS_PER_ROW <= 32) {
    st = stats_warp_allreduce<THREADS_PER_ROW>(st);
  } else {
    st = stats_block_reduce<THREADS_PER_ROW>(st);
  }
  if (lane != 0) return;
  const RowSoftmax soft = finalize(st);
  // A label outside [0, V) (only possible with the range check disabled) yields NaN, never an
  // out-of-bounds read.
  logp[row] = (label >= 0 && label < V) ? log_prob(soft, kept.mask(to_float(row_ptr[label]), label), inv_temperature)
                                        : NAN;
  row_max_out[row] = soft.row_max;
  log_sum_out[row] = soft.log_sum;
  entropy_out[row] = soft.entropy;
}

template <typename T, int THREADS_PER_ROW, int ROWS_PER_BLOCK>
__global__ void __launch_bounds__(THREADS_PER_ROW* ROWS_PER_BLOCK)
    token_logprobs_bwd_kernel(const T* __restrict__ logits, const void* __restrict__ labels, bool labels_int64,
                              const float* __restrict__ row_max, const float* __restrict__ log_sum,
                              const float* __restrict__ entropy,
                              const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                              T* __restrict__ grad_logits, const int32_t* __restrict__ support,
                              int64_t support_stride, int64_t n_rows, int64_t V, int64_t rows_per_outer,
                              int64_t stride_outer, int64_t stride_inner, float inv_temperature,
                              int64_t ignore_index) {
  static_assert(ROWS_PER_BLOCK == 1 || THREADS_PER_ROW == 32, "several rows per block means one warp per row");
  constexpr int kVec = Pack16<T>::kSize;
  const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / THREADS_PER_ROW;
  const int lane = threadIdx.x % THREADS_PER_ROW;
  if (row >= n_rows) return;
  T* grad_row = grad_logits + row * V;
  const int64_t label = load_label(labels, labels_int64, row);

  if (label == ignore_index) {  // zero gradient, logits not read
    const int64_t head = misaligned_head<T>(grad_row, V);
    const int64_t n_packs = (V - head) / kVec;
    const T zero = from_float<T>(0.f);
    for (int64_t i = lane; i < head; i += THREADS_PER_ROW) grad_row[i] = zero;
    for (int64_t i = head + n_packs * kVec + lane; i < V; i += THREADS_PER_ROW) grad_row[i] = zero;
    Pack16<T> zeros;
#pragma unroll
    for (int k = 0; k < kVec; ++k) zeros.v[k] = zero;
    for (int64_t p = lane; p < n_packs; p += THREADS_PER_ROW) store_pack(grad_row + head + p * kVec, zeros);
    return;
  }

  const T* row_ptr = logits + row_offset(row, rows_per_outer, stride_outer, stride_inner);
  const KeptSet kept{support != nullptr ? support + row * support_stride : nullptr};  // p = 0 outside it
  const SoftmaxGrad c(RowSoftmax{row_max[row], log_sum[row], entropy[row]},
                      grad_logp != nullptr ? grad_logp[row] : 0.f, grad_entropy != nullptr ? grad_entropy[row] : 0.f,
                      inv_temperature, label);

  // Packs need the input and the output row at the same offset from a 16-byte boundary (always
  // true for contiguous logits with V % kVec == 0); otherwise the whole row goes element-wise.
  const bool same_alignment =
      (reinterpret_cast<uint64_t>(row_ptr) & 15u) == (reinterpret_cast<uint64_t>(grad_row) & 15u);
  const int64_t head = same_alignment ? misaligned_head<T>(row_ptr, V) : V;
  const int64_t n_packs = (V - head) / kVec;
  const int64_t tail_start = head + n_packs * kVec;
  for (int64_t i = lane; i < head; i += THREADS_PER_ROW) {
    grad_row[i] = from_float<T>(c.grad(kept.mask(to_float(row_ptr[i]), i), i));
  }
  for (int64_t i = tail_start + lane; i < V; i += THREADS_PER_ROW) {
    grad_row[i] = from_float<T>(c.grad(kept.mask(to_float(row_ptr[i]), i), i));
  }
  for (int64_t p0 = lane; p0 < n_packs; p0 += int64_t(THREADS_PER_ROW) * kUnroll) {
    Pack16<T> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + int64_t(u) * THREADS_PER_ROW;
      if (p < n_packs) packs[u] = load_pack(row_ptr + head + p * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = p0 + int64_t(u) * THREADS_PER_ROW;
      if (p < n_packs) {
        Pack16<T> out;
        const int64_t col0 = head + p * kVec;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          out.v[k] = from_float<T>(c.grad(kept.mask(to_float(packs[u].v[k]), col0 + k), col0 + k));
        }
        store_pack(grad_row + col0, out);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration: (threads per row, rows per block) by vocabulary size.
// ---------------------------------------------------------------------------------------------
enum class RowConfig { kWarp, kBlock256, kBlock512 };

RowConfig pick_row_config(int64_t V) {
  if (V <= 2048) return RowConfig::kWarp;
  if (V <= 16384) return RowConfig::kBlock256;
  return RowConfig::kBlock512;
}

template <int THREADS_PER_ROW, int ROWS_PER_BLOCK>
dim3 grid_for(int64_t n_rows) {
  const int64_t blocks = (n_rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("alignkernels._C: too many rows for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

struct ForwardLaunch {
  const void* logits;
  const void* labels;
  bool labels_int64;
  float* logp;
  float* row_max;
  float* log_sum;
  float* entropy;
  const int32_t* support;
  int64_t support_stride;
  int64_t n_rows, V, rows_per_outer, stride_outer, stride_inner;
  float inv_temperature;
  int64_t ignore_index;
  cudaStream_t stream;

  template <typename T, int TPR, int RPB>
  void launch() const {
    token_logprobs_fwd_kernel<T, TPR, RPB><<<grid_for<TPR, RPB>(n_rows), TPR * RPB, 0, stream>>>(
        static_cast<const T*>(logits), labels, labels_int64, logp, row_max, log_sum, entropy, support, support_stride,
        n_rows, V, rows_per_outer, stride_outer, stride_inner, inv_temperature, ignore_index);
  }
};

struct BackwardLaunch {
  const void* logits;
  const void* labels;
  bool labels_int64;
  const float* row_max;
  const float* log_sum;
  const float* entropy;
  const float* grad_logp;
  const float* grad_entropy;
  void* grad_logits;
  const int32_t* support;
  int64_t support_stride;
  int64_t n_rows, V, rows_per_outer, stride_outer, stride_inner;
  float inv_temperature;
  int64_t ignore_index;
  cudaStream_t stream;

  template <typename T, int TPR, int RPB>
  void launch() const {
    token_logprobs_bwd_kernel<T, TPR, RPB><<<grid_for<TPR, RPB>(n_rows), TPR * RPB, 0, stream>>>(
        static_cast<const T*>(logits), labels, labels_int64, row_max, log_sum, entropy, grad_logp, grad_entropy,
        static_cast<T*>(grad_logits), support, support_stride, n_rows, V, rows_per_outer, stride_outer, stride_inner,
        inv_temperature, ignore_index);
  }
};

// Calls launcher.launch<T, TPR, RPB>() for the runtime dtype code and the row config of V.
template <typename Launcher>
void dispatch(int logits_dtype, int64_t V, const Launcher& launcher) {
  auto by_config = [&](auto t_tag) {
    using T = decltype(t_tag);
    switch (pick_row_config(V)) {
      case RowConfig::kWarp:
        launcher.template launch<T, 32, 4>();
        break;
      case RowConfig::kBlock256:
        launcher.template launch<T, 256, 1>();
        break;
      case RowConfig::kBlock512:
        launcher.template launch<T, 512, 1>();
        break;
    }
  };
  switch (logits_dtype) {
    case kFloat32:
      by_config(float{});
      break;
    case kFloat16:
      by_config(__half{});
      break;
    case kBFloat16:
      by_config(__nv_bfloat16{});
      break;
    default:
      throw std::invalid_argument("alignkernels._C: logits dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

bool labels_are_int64(int labels_dtype) {
  if (labels_dtype != kInt32 && labels_dtype != kInt64) {
    throw std::invalid_argument("alignkernels._C: labels dtype code must be 0 (int32) or 1 (int64)");
  }
  return labels_dtype == kInt64;
}

void check_rows(int64_t n_rows, int64_t V, int64_t rows_per_outer) {
  if (n_rows < 0 || V <= 0 || rows_per_outer <= 0) {
    throw std::invalid_argument("alignkernels._C: need n_rows >= 0, vocab > 0 and rows_per_outer > 0");
  }
}

}  // namespace

void token_logprobs_forward(uint64_t logits, int logits_dtype, uint64_t labels, int labels_dtype, uint64_t logp,
                            uint64_t row_max, uint64_t log_sum, uint64_t entropy, uint64_t support,
                            int64_t support_stride, int64_t n_rows, int64_t vocab, int64_t rows_per_outer,
                            int64_t stride_outer, int64_t stride_inner, double inv_temperature, int64_t ignore_index,
                            int device, uint64_t stream) {
  check_rows(n_rows, vocab, rows_per_outer);
  if (n_rows == 0) return;
  DeviceGuard guard(device);
  const ForwardLaunch launcher{reinterpret_cast<const void*>(logits), reinterpret_cast<const void*>(labels),
                               labels_are_int64(labels_dtype),
                               reinterpret_cast<float*>(logp), reinterpret_cast<float*>(row_max),
                               reinterpret_cast<float*>(log_sum), reinterpret_cast<float*>(entropy),
                               reinterpret_cast<const int32_t*>(support), support_stride, n_rows, vocab, rows_per_outer, stride_outer,
                               stride_inner, static_cast<float>(inv_temperature), ignore_index, as_stream(stream)};
  dispatch(logits_dtype, vocab, launcher);
  check_cuda(cudaGetLastError(), "token_logprobs forward launch");
}

void token_logprobs_backward(uint64_t logits, int logits_dtype, uint64_t labels, int labels_dtype,
                             uint64_t row_max, uint64_t log_sum, uint64_t entropy, uint64_t grad_logp, uint64_t grad_entropy, uint64_t grad_logits,
                             uint64_t support, int64_t support_stride, int64_t n_rows, int64_t vocab, int64_t rows_per_outer, int64_t stride_outer,
                             int64_t stride_inner, double inv_temperature, int64_t ignore_index, int device,
                             uint64_t stream) {
  check_rows(n_rows, vocab, rows_per_outer);
  if (n_rows == 0) return;
  DeviceGuard guard(device);
  const BackwardLaunch launcher{reinterpret_cast<const void*>(logits), reinterpret_cast<const void*>(labels),
                                labels_are_int64(labels_dtype),
                                reinterpret_cast<const float*>(row_max), reinterpret_cast<const float*>(log_sum),
                                reinterpret_cast<const float*>(entropy),
                                reinterpret_cast<const float*>(grad_logp), reinterpret_cast<const float*>(grad_entropy),
                                reinterpret_cast<void*>(grad_logits), reinterpret_cast<const int32_t*>(support),
                                support_stride, n_rows, vocab, rows_per_outer, stride_outer,
                                stride_inner, static_cast<float>(inv_temperature), ignore_index, as_stream(stream)};
  dispatch(logits_dtype, vocab, launcher);
  check_cuda(cudaGetLastError(), "token_logprobs backward launch");
}

}  // namespace alignkernels
