// pybind11 module alignkernels._C. Compiled by the host C++ compiler only: it sees plain
// integers (device addresses, shapes, strides, dtype codes, device index, stream handle) and
// no CUDA or torch header, so the module has no torch ABI and imports without a GPU (the CUDA
// runtime is linked statically and only touches the driver at the first launch).
//
// Do not call these directly: alignkernels/_cuda_backend.py validates the tensors (device,
// dtype, contiguity, shapes) and passes their addresses and the current stream, by keyword (the
// names below), so two swapped addresses fail to bind instead of running.
#include <pybind11/pybind11.h>

#include "alignkernels_ops.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignkernels CUDA kernels (raw-pointer API; use alignkernels._cuda_backend)";
  m.attr("FLOAT32") = static_cast<int>(alignkernels::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(alignkernels::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(alignkernels::kBFloat16);
  m.attr("INT32") = static_cast<int>(alignkernels::kInt32);
  m.attr("INT64") = static_cast<int>(alignkernels::kInt64);

  m.def("token_logprobs_forward", &alignkernels::token_logprobs_forward, "logits"_a, "logits_dtype"_a, "labels"_a,
        "labels_dtype"_a, "logp"_a, "row_max"_a, "log_sum"_a, "entropy"_a, "support"_a, "support_stride"_a, "n_rows"_a,
        "vocab"_a,
        "rows_per_outer"_a, "stride_outer"_a, "stride_inner"_a, "inv_temperature"_a, "ignore_index"_a, "device"_a,
        "stream"_a,
        "Per-row log p(label), row max, log Σe^(z-max) and entropy of softmax(logits * inv_temperature) (fp32).");
  m.def("token_logprobs_backward", &alignkernels::token_logprobs_backward, "logits"_a, "logits_dtype"_a, "labels"_a,
        "labels_dtype"_a, "row_max"_a, "log_sum"_a, "entropy"_a, "grad_logp"_a, "grad_entropy"_a, "grad_logits"_a,
        "support"_a, "support_stride"_a, "n_rows"_a,
        "vocab"_a, "rows_per_outer"_a, "stride_outer"_a, "stride_inner"_a, "inv_temperature"_a, "ignore_index"_a,
        "device"_a, "stream"_a, "Gradient of token_logprobs w.r.t. the logits (grad_logp / grad_entropy may be 0).");
  m.def("gather_last", &alignkernels::gather_last, "x"_a, "elem_size"_a, "index"_a, "index_dtype"_a, "out"_a,
        "batch"_a, "seq_len"_a, "row_elems"_a, "stride_batch"_a, "stride_seq"_a, "fill_bits"_a, "device"_a,
        "stream"_a, "out[b] = x[b, index[b]] (byte copy; out-of-range index fills with fill_bits).");
  m.def("gae", &alignkernels::gae, "rewards"_a, "values"_a, "mask"_a, "advantages"_a, "returns"_a, "batch"_a,
        "seq_len"_a, "gamma"_a, "lam"_a, "device"_a, "stream"_a,
        "Generalised advantage estimation (reverse scan) over fp32 [batch, seq_len].");
  m.def("cuda_runtime_version", &alignkernels::cuda_runtime_version,
        "CUDA runtime version the extension was built with (e.g. 13000).");
  m.def("compiled_archs", &alignkernels::compiled_archs, "GPU targets compiled in, e.g. 'sm_80;sm_90;compute_90'.");
}
