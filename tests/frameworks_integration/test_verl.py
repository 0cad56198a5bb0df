"""alignkernels.integrations.verl against verl's own functions (verl 0.9.1, CPU, fp32).

Each parity test runs verl's stock function and the one :func:`apply` binds in its place on the
same inputs: values and every gradient within 2e-6 relative (fp32 vs fp32), and both close to an
fp64 eager computation. verl's Triton ``linear_cross_entropy`` runs on CUDA only, so its
replacement is compared with verl's torch ``FusedLinearForPPO`` (the same quantity, verl's other
backend of ``use_fused_kernels``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

from helpers import ReturnedShapes, max_rel_error

verl = pytest.importorskip("verl")
transformers = pytest.importorskip("transformers")

import verl.utils.experimental.torch_functional as verl_exp  # noqa: E402
import verl.utils.kernel.linear_cross_entropy as verl_lce  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402

import alignkernels.integrations.verl as ak_verl  # noqa: E402

STOCK = {
    "logprobs_from_logits": verl_F.logprobs_from_logits,
    "entropy_from_logits": verl_F.entropy_from_logits,
    "entropy_from_logits_with_chunking": verl_F.entropy_from_logits_with_chunking,
    "FusedLinearForPPO": verl_exp.FusedLinearForPPO,
    "linear_cross_entropy": verl_lce.linear_cross_entropy,
}
TOL = 2e-6



def _logits(shape, seed=0, temperature=0.7):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3.0) / temperature  # verl divides by T before these functions
    return x.requires_grad_()


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out.shape, generator=g)
    return torch.autograd.grad((out * up).sum(), inputs)


def _assert_close(actual, expected, tol=TOL):
    assert actual.shape == expected.shape
    err = max_rel_error(actual.double(), expected.double())
    assert err <= tol, err


# ---------------------------------------------------------------------------------------------
# function-level parity: the logits path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 7, 151), (19, 151)])
def test_logprobs_from_logits_matches_verl(shape):
    logits = _logits(shape)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(2))
    stock = STOCK["logprobs_from_logits"](logits, labels)
    (stock_grad,) = _grads(stock, [logits])
    with ak_verl.apply():
        ours = verl_F.logprobs_from_logits(logits, labels, inplace_backward=False)
        assert ak_verl.adapter_calls() == 1
    (ours_grad,) = _grads(ours, [logits])
    _assert_close(ours, stock)
    _assert_close(ours_grad, stock_grad)
    fp64 = torch.log_softmax(logits.detach().double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    _assert_close(ours, fp64)


@pytest.mark.parametrize("name", ["entropy_from_logits", "entropy_from_logits_with_chunking"])
def test_entropy_from_logits_matches_verl(name):
    logits = _logits((23, 131), seed=3)
    kwargs = {"chunk_size": 5} if name.endswith("chunking") else {}
    stock = STOCK[name](logits, **kwargs)
    (stock_grad,) = _grads(stock, [logits])
    with ak_verl.apply():
        ours = getattr(verl_F, name)(logits, **kwargs)
        assert ak_verl.adapter_calls() == 1
    (ours_grad,) = _grads(ours, [logits])
    _assert_close(ours, stock)
    _assert_close(ours_grad, stock_grad)
    p = torch.softmax(logits.detach().double(), -1)
    _assert_close(ours, -(p * torch.log_softmax(logits.detach().double(), -1)).sum(-1))


def test_compiled_entropy_matches_verl():
    """The FSDP engine compiles the entropy function at construction
    (``torch.compile(entropy_from_logits, dynamic=True)``): ours compiles and matches stock."""
    logits = _logits((2, 9, 67), seed=4)
    stock = torch.compile(STOCK["entropy_from_logits"], dynamic=True)(logits)
    (stock_grad,) = _grads(stock, [logits])
    ak_verl.apply()
    ours = torch.compile(verl_F.entropy_from_logits, dynamic=True)(logits)
    assert ak_verl.adapter_calls() == 1  # counted inside the compiled function too
    (ours_grad,) = _grads(ours, [logits])
    _assert_close(ours, stock)
    _assert_close(ours_grad, stock_grad)


# ---------------------------------------------------------------------------------------------
# the fused head: FusedLinearForPPO and linear_cross_entropy
# ---------------------------------------------------------------------------------------------
def _head_inputs(n_shape=(3, 11), H=32, V=97, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_shape, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, V, n_shape, generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("ndim", [2, 3])
def test_fused_linear_for_ppo_matches_verl(temperature, ndim):
    hidden, weight, ids = _head_inputs((3, 11) if ndim == 3 else (29,))
    stock_lp, stock_ent = STOCK["FusedLinearForPPO"](chunk_size=7)(hidden, weight, ids, temperature)
    stock_grads = _grads(stock_lp + 0.3 * stock_ent, [hidden, weight])
    ak_verl.apply()
    ours_lp, ours_ent = verl_exp.FusedLinearForPPO(chunk_size=7)(hidden, weight, ids, temperature)
    assert ak_verl.adapter_calls() == 1
    ours_grads = _grads(ours_lp + 0.3 * ours_ent, [hidden, weight])
    _assert_close(ours_lp, stock_lp)
    _assert_close(ours_ent, stock_ent)
    for a, b in zip(ours_grads, stock_grads):
        _assert_close(a, b)
    z = (hidden.detach().double() @ weight.detach().double().T) / temperature
    _assert_close(ours_lp, torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("seam", ["FusedLinearForPPO", "linear_cross_entropy"])
def test_fused_head_under_autocast_takes_mixed_dtypes_like_verl(seam):
    """verl's mixed precision: bf16 hidden states, an fp32 lm_head, bf16 autocast. verl's matmul casts
    both; ours did not (TypeError: hidden and weight must have the same dtype). Now it runs on the
    same bf16 operands, with an fp32 tile: close to fp64 on those operands (verl's bf16 logits are not)."""
    hidden, weight, ids = _head_inputs((2, 9))
    hidden = hidden.detach().bfloat16().requires_grad_()
    ak_verl.apply()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if seam == "FusedLinearForPPO":
            logp, ent = verl_exp.FusedLinearForPPO()(hidden, weight, ids, 0.8)
        else:
            logp, ent = verl_lce.linear_cross_entropy(hidden, weight, ids, 0.8)
    logp.sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    z = (hidden.detach().double() @ weight.detach().bfloat16().double().T) / 0.8
    want = torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    _assert_close(logp.reshape(want.shape), want, tol=1e-5)


def test_fused_linear_for_ppo_refuses_unknown_impl_backend_like_verl():
    ak_verl.apply()
    with pytest.raises(ValueError, match="impl_backend|backend"):
        verl_exp.FusedLinearForPPO(impl_backend="cuda")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_matches_verl_torch_backend(reduction):
    hidden, weight, ids = _head_inputs((2, 13))
    stock_lp, stock_ent = STOCK["FusedLinearForPPO"]()(hidden, weight, ids, 0.8)
    stock_lp, stock_ent = stock_lp.reshape(-1), stock_ent.reshape(-1)
    if reduction != "none":
        stock_lp = stock_lp.sum() if reduction == "sum" else stock_lp.mean()
    stock_grads = _grads(stock_lp + stock_ent.sum() * 0.2, [hidden, weight])
    ak_verl.apply()
    ours_lp, ours_ent = verl_lce.linear_cross_entropy(hidden, weight, ids, 0.8, reduction)
    ours_grads = _grads(ours_lp + ours_ent.sum() * 0.2, [hidden, weight])
    assert ours_ent.shape == (26,) and ours_lp.shape == (() if reduction != "none" else (26,))
    _assert_close(ours_lp, stock_lp)
    _assert_close(ours_ent, stock_ent)
    for a, b in zip(ours_grads, stock_grads):
        _assert_close(a, b)


def test_linear_cross_entropy_bad_reduction_names_it():
    hidden, weight, ids = _head_inputs()
    ak_verl.apply()
    with pytest.raises(ValueError, match="reduction"):
        verl_lce.linear_cross_entropy(hidden, weight, ids, 1.0, "avg")


@pytest.mark.parametrize("weight, error", [([[1.0]], TypeError), (torch.zeros(4, 2, 8), ValueError)])
def test_linear_cross_entropy_tensor_parallel_bad_weight_names_it(monkeypatch, weight, error):
    """With a tensor-parallel group the weight is this rank's [V/W, H] shard: anything else by name."""
    import torch.distributed as dist

    group = object()
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: 2 if g is group else 1)
    hidden, _, ids = _head_inputs()
    ak_verl.apply()
    with pytest.raises(error, match="linear_cross_entropy: weight must be"):
        verl_lce.linear_cross_entropy(hidden, weight, ids, 1.0, "none", group)


def test_linear_cross_entropy_can_stay_stock():
    ak_verl.apply(linear_cross_entropy=False)
    assert verl_lce.linear_cross_entropy is STOCK["linear_cross_entropy"]
    assert verl_F.logprobs_from_logits is ak_verl.logprobs_from_logits
    ak_verl.apply()  # the option changed: re-installed with it
    assert verl_lce.linear_cross_entropy is ak_verl.linear_cross_entropy



def _logits_sized(shapes, vocab, n_rows):
    return [s for s in shapes if vocab in s and len(s) >= 2 and torch.Size(s).numel() // vocab >= n_rows]


@pytest.mark.parametrize("seam", ["FusedLinearForPPO", "linear_cross_entropy"])
def test_fused_head_never_holds_token_by_vocab_tensors(seam):
    """Forward and backward of the patched fused head: no aten op returns a tensor with a vocabulary
    dimension and a quarter of the tokens' rows (the detector fires on verl's stock module)."""
    hidden, weight, ids = _head_inputs((4, 40), H=32, V=97)
    n_rows = ids.numel() // 4
    assert n_rows > 32  # the [V, H] weight and its gradient do not count

    def run(fn):
        recorder = ReturnedShapes()
        with recorder:
            lp, ent = fn()
            (lp.sum() + ent.sum()).backward()
        return _logits_sized(recorder.shapes, 97, n_rows)

    assert run(lambda: STOCK["FusedLinearForPPO"]()(hidden, weight, ids))
    ak_verl.apply(chunk_size=8)
    if seam == "FusedLinearForPPO":
        found = run(lambda: verl_exp.FusedLinearForPPO()(hidden, weight, ids))
    else:
        found = run(lambda: verl_lce.linear_cross_entropy(hidden, weight, ids, 1.0))
    assert ak_verl.adapter_calls() == 1
    assert not found, found[:5]


# ---------------------------------------------------------------------------------------------
# verl's own fused forward on a tiny model: tied and untied head, with padding
# ---------------------------------------------------------------------------------------------
def _tiny_qwen2(tied: bool):
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).float()


@pytest.mark.parametrize("tied", [True, False])
def test_verl_fused_forward_tied_and_untied_head(tied):
    from verl.models.transformers.dense_common import forward_with_torch_backend

    model = _tiny_qwen2(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 97, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as verl's rollouts
    input_ids[1, :3] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def run():
        model.zero_grad()
        out = forward_with_torch_backend(model, input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, return_dict=True, temperature=0.7)  # fmt: skip
        mask = attention_mask.float()
        loss = -(out.log_probs * mask).sum() / mask.sum() - 0.01 * (out.entropy * mask).sum() / mask.sum()
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    stock_out, stock_grads = run()
    with ak_verl.apply():
        ours_out, ours_grads = run()
        assert ak_verl.adapter_calls() == 1
    valid = attention_mask.bool()
    _assert_close(ours_out.log_probs[valid], stock_out.log_probs[valid])
    _assert_close(ours_out.entropy[valid], stock_out.entropy[valid])
    assert stock_grads.keys() == ours_grads.keys()
    for name in stock_grads:
        _assert_close(ours_grads[name], stock_grads[name], tol=1e-5)


_TWO_RANKS: list = []  # the per-rank results of the one verl_fsdp_worker.py spawn, shared by its tests


def _two_rank_results(tmp_path_factory):
    import json
    from pathlib import Path

    if _TWO_RANKS:
        if isinstance(_TWO_RANKS[0], str):  # the spawn failed once: every test sharing it reports that
            pytest.fail(_TWO_RANKS[0])
        return _TWO_RANKS[0]
    tmp_path = tmp_path_factory.mktemp("verl_two_ranks")
    worker = Path(__file__).with_name("verl_fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for rank in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            _TWO_RANKS.append("verl_fsdp_worker.py ranks did not finish in 300 s")
            pytest.fail(_TWO_RANKS[0])
    per_rank = []
    for rank, log in enumerate(logs):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results:\n{log[-3000:]}"
        per_rank.append(json.loads(path.read_text()))
    _TWO_RANKS.append(per_rank)
    return per_rank


@pytest.mark.slow
def test_fsdp2_lm_head_own_unit_two_ranks(tmp_path_factory):
    """2 gloo ranks, FSDP2 with the untied lm_head as its own unit (``verl_fsdp_worker.py``): verl's
    stock fused module fails on the DTensor head; patched, losses and every full gradient equal one
    unsharded process (1e-5)."""
    for rank, results in enumerate(_two_rank_results(tmp_path_factory)):
        for check in ("stock", "patched"):
            assert results[check]["ok"], f"rank {rank} {check}:\n{results[check]['error']}"


@pytest.mark.slow
def test_linear_cross_entropy_tensor_parallel_two_ranks(tmp_path_factory):
    """verl's ``linear_cross_entropy`` with a 2-rank tensor-parallel group, each rank its vocabulary shard
    (``verl_fsdp_worker.py``, ``check_tensor_parallel``): the global log-probs and entropies on every
    rank, the shard's ``grad_weight``, the rank's partial ``grad_hidden`` (summing to the full one), within
    2e-6 of fp64 for reduction none / sum / mean."""
    for rank, results in enumerate(_two_rank_results(tmp_path_factory)):
        assert results["tensor_parallel"]["ok"], f"rank {rank}:\n{results['tensor_parallel']['error']}"


# ---------------------------------------------------------------------------------------------
# apply / remove bookkeeping
# ---------------------------------------------------------------------------------------------
def test_apply_rebinds_by_name_imports_and_remove_restores_them():
    import verl.workers.engine.fsdp.transformer_impl as fsdp_engine

    assert fsdp_engine.logprobs_from_logits is STOCK["logprobs_from_logits"]
    patch = ak_verl.apply()
    assert ak_verl.is_applied()
    assert fsdp_engine.logprobs_from_logits is ak_verl.logprobs_from_logits
    assert verl_F.entropy_from_logits is ak_verl.entropy_from_logits
    assert verl_exp.FusedLinearForPPO is ak_verl.FusedLinearForPPO
    # a module imported while applied binds ours by name; remove() restores it too
    sys.modules.pop("verl.workers.rollout.naive.naive_rollout", None)
    import verl.workers.rollout.naive.naive_rollout as late_module

    assert late_module.logprobs_from_logits is ak_verl.logprobs_from_logits
    assert ak_verl.apply() is patch  # idempotent
    patch.remove()
    assert not ak_verl.is_applied()
    assert late_module.logprobs_from_logits is STOCK["logprobs_from_logits"]
    assert fsdp_engine.logprobs_from_logits is STOCK["logprobs_from_logits"]
    for name, original in STOCK.items():
        module = {"FusedLinearForPPO": verl_exp, "linear_cross_entropy": verl_lce}.get(name, verl_F)
        assert getattr(module, name) is original


def test_adapter_calls_counts_every_replacement_and_resets_on_apply():
    logits = _logits((4, 33))
    labels = torch.zeros(4, dtype=torch.long)
    ak_verl.apply()
    verl_F.logprobs_from_logits(logits, labels)
    verl_F.entropy_from_logits(logits)
    verl_F.entropy_from_logits_with_chunking(logits, chunk_size=2)
    hidden, weight, ids = _head_inputs()
    verl_exp.FusedLinearForPPO()(hidden, weight, ids)
    verl_lce.linear_cross_entropy(hidden, weight, ids, 1.0)
    assert ak_verl.adapter_calls() == 5
    ak_verl.apply()  # idempotent: keeps counting
    assert ak_verl.adapter_calls() == 5
    ak_verl.remove()
    verl_F.logprobs_from_logits(logits, labels)  # stock again: not counted
    assert ak_verl.adapter_calls() == 5
    ak_verl.apply()
    assert ak_verl.adapter_calls() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"backend": None}, ValueError, "backend"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"vocab_block_size": True}, TypeError, "vocab_block_size"),
        ({"linear_cross_entropy": "yes"}, TypeError, "linear_cross_entropy"),
        ({"losses": "yes"}, TypeError, "losses"),
        ({"batch_invariant": 1}, TypeError, "batch_invariant"),
        ({"head_precision": "fp64"}, ValueError, "head_precision"),
        ({"batch_invariant": True, "backend": "reference"}, ValueError, "batch_invariant"),
    ],
)
def test_bad_apply_names_the_argument_and_patches_nothing(kwargs, error, match):
    with pytest.raises(error, match=match):
        ak_verl.apply(**kwargs)
    assert not ak_verl.is_applied()
    assert verl_F.logprobs_from_logits is STOCK["logprobs_from_logits"]


def test_apply_swaps_the_fsdp_engine_methods_and_remove_restores_them():
    """``FSDPEngineWithLMHead.prepare_model_outputs`` / ``.forward_step`` (class attributes) become the
    one-pass / Σπ² ones (``alignkernels/integrations/verl_engine.py``) and come back on ``remove()``;
    the value-head engine keeps its own ``prepare_model_outputs``."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    stock = {n: vars(FSDPEngineWithLMHead)[n] for n in ("prepare_model_outputs", "forward_step")}
    value_head = vars(FSDPEngineWithValueHead)["prepare_model_outputs"]
    with ak_verl.apply():
        for name, original in stock.items():
            swapped = vars(FSDPEngineWithLMHead)[name]
            assert swapped is not original and swapped.__module__ == "alignkernels.integrations.verl_engine"
        assert vars(FSDPEngineWithValueHead)["prepare_model_outputs"] is value_head
    for name, original in stock.items():
        assert vars(FSDPEngineWithLMHead)[name] is original


def test_bad_options_after_apply_keep_the_previous_patch():
    ak_verl.apply(chunk_size=16)
    with pytest.raises(ValueError, match="backend"):
        ak_verl.apply(backend="nope")
    assert ak_verl.is_applied() and verl_F.logprobs_from_logits is ak_verl.logprobs_from_logits


class _ReadOnlyModule(types.ModuleType):
    def __setattr__(self, name, value):
        raise AttributeError(f"{self.__name__} is read-only")


def test_apply_failing_half_way_leaves_verl_untouched():
    frozen = _ReadOnlyModule("verl.zz_read_only")
    vars(frozen)["logprobs_from_logits"] = STOCK["logprobs_from_logits"]  # bound after the others
    sys.modules[frozen.__name__] = frozen
    try:
        with pytest.raises(AttributeError, match="read-only"):
            ak_verl.apply()
    finally:
        del sys.modules[frozen.__name__]
    assert not ak_verl.is_applied()
    assert verl_F.logprobs_from_logits is STOCK["logprobs_from_logits"]
    assert verl_exp.FusedLinearForPPO is STOCK["FusedLinearForPPO"]


def test_replacements_refuse_bad_inputs_by_name():
    ak_verl.apply()
    with pytest.raises(ValueError, match="chunk_size"):
        verl_F.entropy_from_logits_with_chunking(_logits((3, 5)), chunk_size=0)
    with pytest.raises(TypeError, match="labels"):
        verl_F.logprobs_from_logits(_logits((3, 5)), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        hidden, weight, ids = _head_inputs()
        verl_exp.FusedLinearForPPO()(hidden, weight, ids, 0.0)


# ---------------------------------------------------------------------------------------------
# worker activation: environment variables, the verl.plugins entry point
# ---------------------------------------------------------------------------------------------
_PROBE = (
    "import verl, verl.utils.torch_functional as F, alignkernels.integrations.verl as v; "
    "print(F.logprobs_from_logits is v.logprobs_from_logits, v.is_applied(), v.options().chunk_size)"
)


def _run_probe(env_extra, cwd, expect_stderr=None):
    # cwd outside the checkout: a stale ``alignkernels.egg-info`` at its root (a local build) would hide the
    # installed entry points from importlib.metadata
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNKERNELS_VERL")}
    env.update(env_extra)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if expect_stderr is not None:
        assert expect_stderr in out.stderr, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.slow
def test_import_verl_with_env_switch_patches_the_process(tmp_path):
    env = {"ALIGNKERNELS_VERL": "1", "ALIGNKERNELS_VERL_CHUNK_SIZE": "64"}
    assert _run_probe(env, tmp_path) == ["True", "True", "64"]


@pytest.mark.slow
def test_import_verl_with_a_bad_option_logs_the_error_loudly(tmp_path):
    """verl's plugin loader swallows a plugin's exception: the error is logged, naming the variable."""
    env = {"ALIGNKERNELS_VERL": "1", "ALIGNKERNELS_VERL_BACKEND": "cuda"}
    assert _run_probe(env, tmp_path, expect_stderr="ALIGNKERNELS_VERL_BACKEND") == ["False", "False", "None"]


@pytest.mark.slow
def test_import_verl_without_env_switch_changes_nothing(tmp_path):
    assert _run_probe({}, tmp_path) == ["False", "False", "None"]


def test_worker_setup_applies_from_env_unless_switched_off(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ALIGNKERNELS_VERL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALIGNKERNELS_VERL_BACKEND", "torch")
    monkeypatch.setenv("ALIGNKERNELS_VERL_LINEAR_CROSS_ENTROPY", "0")
    ak_verl.worker_setup()
    assert ak_verl.is_applied()
    assert verl_lce.linear_cross_entropy is STOCK["linear_cross_entropy"]
    ak_verl.remove()
    assert ak_verl.apply_from_env() is None and not ak_verl.is_applied()  # the plugin's form needs the switch
    monkeypatch.setenv("ALIGNKERNELS_VERL", "0")
    ak_verl.worker_setup()
    assert not ak_verl.is_applied()


@pytest.mark.parametrize(
    "name, value", [("ALIGNKERNELS_VERL", "maybe"), ("ALIGNKERNELS_VERL_CHUNK_SIZE", "-3"),
                    ("ALIGNKERNELS_VERL_BACKEND", "cuda"), ("ALIGNKERNELS_VERL_LINEAR_CROSS_ENTROPY", "2")],
)  # fmt: skip
def test_bad_environment_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv("ALIGNKERNELS_VERL", "1")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        ak_verl.worker_setup()
    assert not ak_verl.is_applied()
