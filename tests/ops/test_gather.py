"""gather_last / last_token_index / sequence_logprobs against row-by-row loop references and
against transformers' own sequence-classification pooling (a tiny LlamaForSequenceClassification
built from a config)."""
import pytest
import torch

import alignkernels
from alignkernels import gather_last, last_token_index, sequence_logprobs
from alignkernels.reference import (
    gather_last_reference,
    last_token_index_reference,
    sequence_logprobs_reference,
)
from helpers import HAS_CUDA, TRITON_DEVICE

BACKENDS = ["torch", "triton"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def right_padded(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()


def left_padded(lengths, T):
    return (torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]).long()


MASKS = {
    "right": right_padded([5, 1, 7, 3, 7], 7),
    "left": left_padded([5, 1, 7, 3, 7], 7),
    "all_ones": torch.ones(4, 9, dtype=torch.long),
    "single_token_rows": torch.ones(3, 1, dtype=torch.long),
    "one_token_each": right_padded([1, 1, 1], 6),
    "with_empty_row": right_padded([4, 0, 2], 5),
    "holes_bool": torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool),
    "float_mask": left_padded([2, 6, 3], 6).float(),
}


# --------------------------------------------------------------------------------------------
# last_token_index
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MASKS))
def test_last_token_index_vs_loop(name):
    mask = MASKS[name]
    index = last_token_index(mask)
    assert index.dtype == torch.int64
    torch.testing.assert_close(index, last_token_index_reference(mask != 0))


def test_last_token_index_right_and_left_closed_form():
    lengths = torch.tensor([5, 1, 7, 3])
    assert last_token_index(right_padded(lengths.tolist(), 7)).tolist() == (lengths - 1).tolist()
    assert last_token_index(left_padded(lengths.tolist(), 7)).tolist() == [6, 6, 6, 6]


def test_last_token_index_random_masks_vs_loop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 33, generator=g) < 0.3
    torch.testing.assert_close(last_token_index(mask), last_token_index_reference(mask))


def test_last_token_index_input_ids_and_packed():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 3], [0, 0, 0, 0, 0], [4, 0, 4, 0, 0]])
    torch.testing.assert_close(last_token_index(input_ids=ids, pad_token_id=0), last_token_index_reference(ids != 0))
    cu = torch.tensor([0, 3, 4, 4, 9], dtype=torch.int32)  # sequence 2 is empty
    assert last_token_index(cu_seqlens=cu).tolist() == [2, 3, 4, 8]


# --------------------------------------------------------------------------------------------
# gather_last, padded
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gather_last_vs_loop(backend, name, dtype):
    device = _device(backend)
    mask = MASKS[name]
    B, T = mask.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 37, generator=g).to(dtype).to(device).requires_grad_()
    out, index = gather_last(x, mask.to(device), return_index=True, backend=backend)
    expected = gather_last_reference(x.detach().cpu(), mask != 0)
    assert out.dtype == dtype and out.shape == (B, 37)
    assert torch.equal(out.detach().cpu(), expected)  # a gather is exact in every dtype
    assert torch.equal(index.cpu(), last_token_index_reference(mask != 0))
    grad = torch.randn(B, 37, generator=g).to(dtype).to(device)
    out.backward(grad)
    expected_grad = torch.zeros(B, T, 37, dtype=dtype)
    expected_grad[torch.arange(B), index.cpu()] = grad.cpu()
    assert torch.equal(x.grad.cpu(), expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 7), (4, 7, 2, 3), (3, 5, 1)], ids=["per_token_values", "4d", "width1"])
def test_gather_last_other_ranks(backend, shape):
    device = _device(backend)
    mask = left_padded([3, 7, 1, 5][: shape[0]], shape[1]) if shape[1] == 7 else right_padded([5, 2, 1], 5)
    x = torch.randn(shape).to(device)
    out = gather_last(x, mask.to(device), backend=backend)
    assert out.shape == (shape[0],) + shape[2:]
    assert torch.equal(out.cpu(), gather_last_reference(x.cpu(), mask != 0))


@pytest.mark.parametrize("T,D", [(2100, 5), (3, 4200)], ids=["T_past_largest_tile", "D_past_largest_tile"])
def test_triton_kernel_multi_tile_loops(T, D):
    """Shapes beyond the largest tile make the kernel loop over the mask row / the copied row."""
    mask = torch.zeros(2, T, dtype=torch.long)
    mask[0, : T - 1] = 1
    mask[1, T - 1] = 1
    x = torch.randn(2, T, D)
    out = gather_last(x.to(TRITON_DEVICE), mask.to(TRITON_DEVICE), backend="triton")
    assert torch.equal(out.cpu(), x[torch.tensor([0, 1]), torch.tensor([T - 2, T - 1])])


def test_strided_input_and_no_mask():
    x = torch.randn(3, 8, 16)
    view = x[:, :-1]  # the usual shifted slice, not contiguous
    mask = right_padded([7, 2, 4], 7)
    for backend in BACKENDS:
        device = _device(backend)
        got = gather_last(view.to(device), mask.to(device), backend=backend).cpu()
        assert torch.equal(got, gather_last_reference(view, mask != 0))
    assert torch.equal(gather_last(x), x[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_integer_values(backend):
    device = _device(backend)
    out = gather_last(torch.randn(0, 5, 3, device=device), torch.ones(0, 5, device=device), backend=backend)
    assert out.shape == (0, 3)
    ids = torch.arange(12, device=device).view(2, 6)  # gathering token ids (not a float tensor)
    mask = right_padded([4, 6], 6).to(device)
    assert gather_last(ids, mask, backend=backend).tolist() == [3, 11]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_empty_rows(backend):
    device = _device(backend)
    mask = MASKS["with_empty_row"].to(device)
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    out = gather_last(x, mask, zero_empty=True, backend=backend)
    assert (out[1] == 0).all()
    assert torch.equal(out[0], x[0, 3]) and torch.equal(out[2], x[2, 1])
    out.sum().backward()
    assert (x.grad[1] == 0).all() and x.grad[0, 3].eq(1).all()


# --------------------------------------------------------------------------------------------
# gather_last, packed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cu", [[0, 3, 4, 9], [0, 0, 2, 2, 6], [0, 1, 2, 3], [0, 5, 5]], ids=["plain", "empties", "singletons", "trailing_empty"]
)
def test_gather_last_packed_vs_loop(cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    N = int(cu[-1])
    x = torch.randn(N, 6, requires_grad=True)
    out = gather_last(x, cu_seqlens=cu)
    assert torch.equal(out.detach(), gather_last_reference(x.detach(), cu_seqlens=cu))
    # HF packed layout [1, N, H] gives the same rows
    assert torch.equal(gather_last(x.detach()[None], cu_seqlens=cu), out.detach())
    out.sum().backward()
    assert x.grad.sum() == out.numel()
    nonempty = cu[1:] > cu[:-1]
    zeroed = gather_last(x.detach(), cu_seqlens=cu, zero_empty=True)
    assert (zeroed[~nonempty] == 0).all() and torch.equal(zeroed[nonempty], out.detach()[nonempty])


def test_packed_matches_padded():
    """The same sequences packed or right-padded give the same last rows."""
    lengths = [4, 1, 6]
    T, H = 6, 5
    mask = right_padded(lengths, T)
    x_pad = torch.randn(3, T, H)
    x_packed = torch.cat([x_pad[b, :n] for b, n in enumerate(lengths)])
    cu = torch.tensor([0, 4, 5, 11])
    assert torch.equal(gather_last(x_packed, cu_seqlens=cu), gather_last(x_pad, mask))


# --------------------------------------------------------------------------------------------
# transformers' sequence-classification pooling
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama_cls():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_matches_transformers_sequence_classification(tiny_llama_cls, padding):
    model = tiny_llama_cls
    lengths = [6, 2, 9, 1]
    T = 9
    g = torch.Generator().manual_seed(2)
    mask = right_padded(lengths, T) if padding == "right" else left_padded(lengths, T)
    ids = torch.randint(1, 64, (4, T), generator=g) * mask  # pad id 0 outside the mask
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask).logits  # [B, num_labels]
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        per_token_scores = model.score(hidden)  # [B, T, num_labels]
    # position from input_ids + pad_token_id: transformers' own rule
    ours = gather_last(per_token_scores, input_ids=ids, pad_token_id=0)
    assert torch.equal(ours, pooled)
    # from the attention mask, then the head (what a fused reward model does): the same rows, scored by a
    # [B, H] GEMM instead of a [B, T, H] one, so equal up to one fp32 rounding of the dot products
    torch.testing.assert_close(model.score(gather_last(hidden, mask)), pooled, rtol=1e-6, atol=1e-7)
    for backend in BACKENDS:
        device = _device(backend)
        got = gather_last(per_token_scores.to(device), mask.to(device), backend=backend)
        assert torch.equal(got.cpu(), pooled)
    # transformers' index = argmax(arange * non_pad)
    hf_index = (torch.arange(T, dtype=torch.int32) * (ids != 0).int()).argmax(-1)
    assert torch.equal(last_token_index(input_ids=ids, pad_token_id=0), hf_index.long())


# --------------------------------------------------------------------------------------------
# sequence_logprobs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("name", ["right", "left", "with_empty_row", "holes_bool", "float_mask", "single_token_rows"])
def test_sequence_logprobs_vs_loop(name, average):
    mask = MASKS[name]
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(mask.shape, generator=g) * 4).requires_grad_()
    out = sequence_logprobs(logp, mask, average=average)
    assert out.dtype == torch.float32 and out.shape == mask.shape[:1]
    expected = sequence_logprobs_reference(logp.detach(), mask, average)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    counts = (mask != 0).sum(-1, keepdim=True).clamp(min=1)
    expected = (mask != 0).float() / (counts if average else 1)
    torch.testing.assert_close(logp.grad, expected.expand_as(logp.grad))


def test_sequence_logprobs_fully_masked_and_garbage():
    logp = torch.tensor([[float("nan"), float("-inf"), 1.0], [-1.0, -2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    for average in (False, True):
        out = sequence_logprobs(logp, mask, average=average)
        assert torch.isfinite(out).all() and out[0] == 0
        assert out[1].item() == (-3.0 if not average else -1.5)
        (g,) = torch.autograd.grad(out.sum(), logp)
        assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()


def test_sequence_logprobs_bf16_and_batch_dims():
    """bf16 log-probs are summed in fp32: equal to the fp32 sum of the bf16 values (to fp32 rounding)."""
    logp = (-torch.rand(2, 3, 50) * 3).bfloat16()
    mask = torch.rand(2, 3, 50) < 0.7
    out = sequence_logprobs(logp, mask)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    torch.testing.assert_close(out.double(), sequence_logprobs_reference(logp.float(), mask), rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors and exports
# --------------------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4)
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        gather_last(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="at most one"):
        gather_last(x, mask, cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="pad_token_id"):
        gather_last(x, input_ids=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        gather_last(x, input_ids=torch.ones(2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        last_token_index()
    with pytest.raises(ValueError, match="exactly one"):
        last_token_index(mask, cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        last_token_index(cu_seqlens=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="cu_seqlens"):
        last_token_index(cu_seqlens=torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="mask.*shape"):
        sequence_logprobs(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(TypeError, match="logp"):
        sequence_logprobs(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="backend"):
        gather_last(x, mask, backend="nope")
    assert alignkernels.gather_last is gather_last


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kernels_match_torch_large(backend):
    if backend == "cuda":
        from alignkernels._cuda_backend import extension

        try:
            extension()
        except RuntimeError as err:
            pytest.skip(f"CUDA extension unavailable: {err}")
    B, T, H = 16, 4096, 4096
    x = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), device="cuda")
    mask = torch.arange(T, device="cuda")[None] < lengths[:, None]
    mask[0] = False  # an empty row
    mask[1] = mask[1].flip(0)  # left padding
    a = gather_last(x, mask, backend=backend)
    b = gather_last(x, mask, backend="torch")
    assert torch.equal(a, b)
    (ga,) = torch.autograd.grad(a.float().sum(), x)
    (gb,) = torch.autograd.grad(b.float().sum(), x)
    assert torch.equal(ga, gb)
