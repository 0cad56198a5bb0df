// Host entry points of the alignkernels CUDA extension. Plain C++ types only (no CUDA, no torch
// headers): tensors arrive as raw device addresses (uint64), shapes and element strides as
// int64, dtypes as the codes below, and the CUDA stream as its handle (uint64), so the pybind11
// bindings compile with the host compiler alone and carry no torch ABI.
//
// Every function launches asynchronously on `stream` after making `device` current, and throws
// std::runtime_error (RuntimeError in Python) on an invalid argument or a launch error.
#pragma once

#include <cstdint>
#include <string>

namespace alignkernels {

// Floating dtypes of kernel inputs / outputs.
enum FloatCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Integer dtypes of labels / indices.
enum IndexCode : int { kInt32 = 0, kInt64 = 1 };

// Per row r of logits viewed as rows (row r starts at element
// (r / rows_per_outer) * stride_outer + (r % rows_per_outer) * stride_inner; last dim contiguous),
// with z = logits * inv_temperature, the centred softmax state of the row (see softmax.cuh):
//   row_max[r] = max z,  log_sum[r] = log Σ e^(z − row_max),  logsumexp = row_max + log_sum,
//   logp[r] = (z[label] − row_max) − log_sum,  entropy[r] = log_sum − Σ softmax(z)·(z − row_max).
// Rows whose label equals ignore_index are not read and get 0 in all four outputs; a label
// outside [0, V) gives logp = NaN (never an out-of-bounds read). Outputs are fp32 [n_rows].
// support: 0, or the sampler's kept tokens, int32 [n_rows, ceil(V/32)] words (row stride
// support_stride; bit v % 32, LSB first, of word v / 32): logits outside them count as -inf
// (the distribution renormalised over the kept set; a label outside it: logp = -inf).
void token_logprobs_forward(uint64_t logits, int logits_dtype, uint64_t labels, int labels_dtype, uint64_t logp,
                            uint64_t row_max, uint64_t log_sum, uint64_t entropy, uint64_t support,
                            int64_t support_stride, int64_t n_rows, int64_t vocab, int64_t rows_per_outer,
                            int64_t stride_outer, int64_t stride_inner, double inv_temperature, int64_t ignore_index,
                            int device, uint64_t stream);

// grad_logits[r, i] = [g_logp (onehot_i - p_i) - g_H p_i (z_i - Σp·z)] * inv_temperature, written
// contiguous [n_rows, V] in the dtype of logits; 0 on ignored rows. p and z − Σp·z are formed from
// the forward's (row_max, log_sum, entropy). grad_logp / grad_entropy are fp32 [n_rows] device
// addresses, or 0 when that upstream gradient is absent (treated as zero). support as forward.
void token_logprobs_backward(uint64_t logits, int logits_dtype, uint64_t labels, int labels_dtype,
                             uint64_t row_max, uint64_t log_sum, uint64_t entropy, uint64_t grad_logp, uint64_t grad_entropy, uint64_t grad_logits,
                             uint64_t support, int64_t support_stride, int64_t n_rows, int64_t vocab, int64_t rows_per_outer, int64_t stride_outer,
                             int64_t stride_inner, double inv_temperature, int64_t ignore_index, int device,
                             uint64_t stream);

// out[b, :] = x[b, index[b], :] for b < batch: a byte copy of row_elems elements of elem_size
// bytes (1, 2, 4 or 8; any dtype). x row (b, t) starts at element b * stride_batch + t * stride_seq
// and is contiguous; out is contiguous [batch, row_elems]. An index outside [0, seq_len) fills the
// output row with `fill_bits` (an 8-byte pattern repeating the element's fill value: NaN for
// floating dtypes) instead of reading out of bounds.
void gather_last(uint64_t x, int64_t elem_size, uint64_t index, int index_dtype, uint64_t out, int64_t batch,
                 int64_t seq_len, int64_t row_elems, int64_t stride_batch, int64_t stride_seq, uint64_t fill_bits,
                 int device, uint64_t stream);

// Generalised advantage estimation, one reverse scan per row of contiguous fp32 [batch, T]
// inputs, verl's masked recursion (= alignkernels.reference.gae_reference). Over positions with
// mask != 0, from the end:  delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma*lam*A_next,
// returns_t = A_t + V_t, where V_next / A_next belong to the next position with mask != 0 (0 past
// the end). Positions with mask == 0 are skipped and get A = returns = 0.
void gae(uint64_t rewards, uint64_t values, uint64_t mask, uint64_t advantages, uint64_t returns, int64_t batch,
         int64_t seq_len, double gamma, double lam, int device, uint64_t stream);

// CUDA runtime version the extension was built with (e.g. 13000), and the SASS/PTX targets.
int cuda_runtime_version();
std::string compiled_archs();

}  // namespace alignkernels
