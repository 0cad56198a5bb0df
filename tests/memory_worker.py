"""Measure the peak extra host memory (bytes above the inputs) of one op call, in a fresh process.

Usage: python tests/memory_worker.py <case> <provider> <mode>  -> prints one JSON object.
Peak RSS comes from getrusage (ru_maxrss, the process high-water mark); the baseline is taken
after torch is imported, the inputs are allocated and touched, and a tiny warm-up call ran (so
allocator/library start-up is not billed to the op). For mode "fwd_bwd" the gradient tensor
(same size as the logits: unavoidable output) is subtracted and reported separately.
"""
import json
import resource
import sys

import torch


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def token_logprobs_case(provider, mode):
    import alignkernels
    from alignkernels.reference import token_logprobs_reference

    N, V = 2048, 131072
    torch.manual_seed(0)

    def run(logits, labels):
        if provider == "eager":
            return token_logprobs_reference(logits, labels, return_entropy=True)
        return alignkernels.token_logprobs(logits, labels, return_entropy=True, backend=provider)

    small = torch.randn(4, 64, requires_grad=True)
    lp, ent = run(small, torch.randint(0, 64, (4,)))
    (lp.sum() + ent.sum()).backward()

    logits = torch.randn(N, V).requires_grad_(mode == "fwd_bwd")
    labels = torch.randint(0, V, (N,))
    base = peak_rss_bytes()
    if mode == "fwd":
        with torch.no_grad():
            run(logits, labels)
        grad_bytes = 0
    else:
        lp, ent = run(logits, labels)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grad_bytes = logits.grad.numel() * logits.grad.element_size()
    return dict(extra_bytes=peak_rss_bytes() - base - grad_bytes, grad_bytes=grad_bytes,
                logits_bytes=logits.numel() * logits.element_size())  # fmt: skip


if __name__ == "__main__":
    case, provider, mode = sys.argv[1:4]
    torch.set_num_threads(2)
    print(json.dumps({"token_logprobs": token_logprobs_case}[case](provider, mode)))
