// gather_last: out[b, :] = x[b, index[b], :] -- the hidden state of the last non-padding token
// per sequence (reward / value heads). A dtype-agnostic byte copy of one row per batch entry.
//
// Memory model: reads and writes batch·row_bytes; each row is copied with the widest access
// (16, 8, 4, 2 or 1 bytes) that the source row, the destination row and the row length all
// allow. Grid: (batch, chunks of the row) so a small batch with wide rows still fills the GPU.

#include "common.cuh"

namespace alignkernels {
namespace {

constexpr int kGatherThreads = 128;

template <typename W>
__device__ __forceinline__ W fill_word(uint64_t fill_bits) {
  if constexpr (sizeof(W) == 16) {
    return make_uint4(static_cast<uint32_t>(fill_bits), static_cast<uint32_t>(fill_bits >> 32),
                      static_cast<uint32_t>(fill_bits), static_cast<uint32_t>(fill_bits >> 32));
  } else {
    return static_cast<W>(fill_bits);  // the pattern repeats with the element's period
  }
}

template <typename W>
__device__ __forceinline__ void copy_row(const char* src, char* dst, int64_t row_bytes, bool valid,
                                         uint64_t fill_bits) {
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  const int64_t n = row_bytes / int64_t(sizeof(W));
  const int64_t step = int64_t(gridDim.y) * blockDim.x;
  const W fill = fill_word<W>(fill_bits);
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < n; i += step) {
    d[i] = valid ? s[i] : fill;
  }
}

template <typename I>
__global__ void __launch_bounds__(kGatherThreads)
    gather_last_kernel(const char* __restrict__ x, const I* __restrict__ index, char* __restrict__ out,
                       int64_t seq_len, int64_t row_bytes, int64_t stride_batch_bytes, int64_t stride_seq_bytes,
                       uint64_t fill_bits) {
  const int64_t b = blockIdx.x;
  const int64_t t = static_cast<int64_t>(index[b]);
  const bool valid = t >= 0 && t < seq_len;  // out of range: fill, never read out of bounds
  const char* src = x + b * stride_batch_bytes + (valid ? t : 0) * stride_seq_bytes;
  char* dst = out + b * row_bytes;
  const uint64_t alignment = reinterpret_cast<uint64_t>(src) | reinterpret_cast<uint64_t>(dst) |
                             static_cast<uint64_t>(row_bytes);
  if ((alignment & 15u) == 0) {
    copy_row<uint4>(src, dst, row_bytes, valid, fill_bits);
  } else if ((alignment & 7u) == 0) {
    copy_row<uint64_t>(src, dst, row_bytes, valid, fill_bits);
  } else if ((alignment & 3u) == 0) {
    copy_row<uint32_t>(src, dst, row_bytes, valid, fill_bits);
  } else if ((alignment & 1u) == 0) {
    copy_row<uint16_t>(src, dst, row_bytes, valid, fill_bits);
  } else {
    copy_row<uint8_t>(src, dst, row_bytes, valid, fill_bits);
  }
}

}  // namespace

void gather_last(uint64_t x, int64_t elem_size, uint64_t index, int index_dtype, uint64_t out, int64_t batch,
                 int64_t seq_len, int64_t row_elems, int64_t stride_batch, int64_t stride_seq, uint64_t fill_bits,
                 int device, uint64_t stream) {
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) {
    throw std::invalid_argument("alignkernels._C.gather_last: elem_size must be 1, 2, 4 or 8");
  }
  if (batch < 0 || seq_len < 0 || row_elems < 0) {
    throw std::invalid_argument("alignkernels._C.gather_last: negative size");
  }
  if (batch == 0 || row_elems == 0) return;
  if (batch > 0x7fffffffLL) throw std::invalid_argument("alignkernels._C.gather_last: batch too large");
  DeviceGuard guard(device);
  const int64_t row_bytes = row_elems * elem_size;
  // Enough blocks along the row for ~4 passes of 16-byte words per thread, at most 64.
  const int64_t words = (row_bytes + 15) / 16;
  int64_t chunks = (words + kGatherThreads * 4 - 1) / (kGatherThreads * 4);
  chunks = chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(chunks));
  const char* xp = reinterpret_cast<const char*>(x);
  char* op = reinterpret_cast<char*>(out);
  if (index_dtype == kInt32) {
    gather_last_kernel<int32_t><<<grid, kGatherThreads, 0, as_stream(stream)>>>(
        xp, reinterpret_cast<const int32_t*>(index), op, seq_len, row_bytes, stride_batch * elem_size,
        stride_seq * elem_size, fill_bits);
  } else if (index_dtype == kInt64) {
    gather_last_kernel<int64_t><<<grid, kGatherThreads, 0, as_stream(stream)>>>(
        xp, reinterpret_cast<const int64_t*>(index), op, seq_len, row_bytes, stride_batch * elem_size,
        stride_seq * elem_size, fill_bits);
  } else {
    throw std::invalid_argument("alignkernels._C.gather_last: index dtype code must be 0 (int32) or 1 (int64)");
  }
  check_cuda(cudaGetLastError(), "gather_last launch");
}

}  // namespace alignkernels
