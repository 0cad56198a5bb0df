"""verl drop-in: one call (or one environment variable in the Ray workers) and verl's LM head runs on
alignkernels.

    import alignkernels.integrations.verl as ak_verl
    ak_verl.apply()          # in the process that builds the actor engine (a Ray worker: see below)

The seams (verl 0.9.1), each rebound by :mod:`alignkernels.integrations.rebind` in every loaded
``verl`` module that binds it (and in the defining module, so later imports get ours):

- ``verl.utils.torch_functional.logprobs_from_logits(logits, labels, inplace_backward=True)`` → one
  :func:`alignkernels.token_logprobs` pass (the default logits path; bound by name in the FSDP
  engine ``verl/workers/engine/fsdp/transformer_impl.py`` and others).
- ``entropy_from_logits(logits)`` / ``entropy_from_logits_with_chunking(logits, chunk_size)`` →
  ``token_logprobs(..., return_entropy=True)``: the softmax never exists, the entropy's gradient is
  the op's. The FSDP engine wraps the chosen function in ``torch.compile`` **when it is built**, so
  :func:`apply` must run before the engine is constructed (the worker hooks below do).
- ``FSDPEngineWithLMHead.prepare_model_outputs`` / ``.forward_step`` (the FSDP engine's methods,
  class attributes): on the logits path log-prob and entropy in one ``token_logprobs`` pass instead of
  the two above; ``calculate_sum_pi_squared`` with ``use_fused_kernels`` (refused by verl) from the
  fused head's tiles. :mod:`alignkernels.integrations.verl_engine` says what runs where. :func:`apply`
  imports verl's FSDP engine module, which resolves verl's platform (``VERL_PLATFORM``): select it first.
- ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``use_fused_kernels`` with the torch
  or liger backend; imported lazily by ``verl/models/transformers/dense_common.py`` and the VLM
  forwards) → :class:`FusedLinearForPPO` on :func:`alignkernels.linear_logprobs`: ``[N, V]`` logits
  never exist. An lm_head that FSDP2 shards as its own unit reaches the forward as a DTensor (verl's
  stock module fails there: ``aten.mm.default got mixed torch.Tensor and DTensor``); it is gathered
  with :func:`alignkernels.ops.vocab_parallel.gather_lm_head` (``grad_reduce="avg"``) first.
- ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the Triton ``use_fused_kernels``
  backend; CUDA only in verl) → :func:`linear_cross_entropy` on ``linear_logprobs`` (process group of
  one rank or none). With a tensor-parallel group of ``W`` ranks (Megatron, bound at import in
  ``verl/models/mcore/model_forward_fused.py`` and ``model_forward_1f1b_overlap.py``) it runs
  :func:`alignkernels.ops.vocab_parallel.vocab_parallel_linear_logprobs` as verl's kernel
  (``verl/utils/kernel/kernels.py``) does: each rank passes the replicated ``hidden`` and its
  ``[V/W, H]`` shard holding the ids from ``rank x V/W``; every rank gets the log-probs and entropies
  of the global distribution; ``grad_weight`` is the shard's, ``grad_hidden`` the rank's partial term
  (``grad_hidden="partial"``), which Megatron reduces. ``apply(linear_cross_entropy=False)`` keeps
  verl's kernel.

Semantics: the same values and gradients as verl's functions (fp32: ~1e-6 relative, pinned in
``tests/frameworks_integration/test_verl.py`` against verl's own functions). Differences, all
towards fp64: log-probs and entropies are fp32 whatever the logits dtype (verl returns bf16 for
bf16 logits, and ``FusedLinearForPPO``'s entropy in the hidden dtype); a label equal to
``ignore_index`` (-100, never a token id) gives 0 instead of an indexing error.

Memory: ``logprobs_from_logits`` / ``entropy_from_logits`` hold O(chunk x V) beyond the logits
(verl's ``entropy_from_logits`` holds a full softmax ``[N, V]`` and its autograd graph);
``FusedLinearForPPO`` / ``linear_cross_entropy`` hold O(chunk x block) for one logits tile.

Worker processes: :func:`worker_setup` is a Ray ``worker_process_setup_hook``; the ``verl.plugins``
entry point :mod:`alignkernels.integrations.verl_plugin` applies when ``ALIGNKERNELS_VERL=1`` is set
(nothing otherwise). Options from the environment: ``ALIGNKERNELS_VERL_BACKEND``,
``ALIGNKERNELS_VERL_CHUNK_SIZE``, ``ALIGNKERNELS_VERL_VOCAB_BLOCK_SIZE``,
``ALIGNKERNELS_VERL_LINEAR_CROSS_ENTROPY``, ``ALIGNKERNELS_VERL_LOSSES``, ``ALIGNKERNELS_VERL_BATCH_INVARIANT``,
``ALIGNKERNELS_VERL_HEAD_PRECISION`` (``docs/INTEGRATION.md``, "verl").

Losses (``apply(losses=True)``): verl's policy-loss registry, ``agg_loss``, ``kl_penalty`` and
``compute_value_loss`` on alignkernels' rows, see :mod:`alignkernels.integrations.verl_losses`.
Train-inference consistency: ``apply(batch_invariant=True)`` and ``apply(head_precision=)`` reach every
seam's op (``apply``'s docstring says which seam takes which).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from alignkernels.integrations.activation import env_choice, env_positive_int, env_switch
from alignkernels.integrations.rebind import DropIn, Patch, Swap
from alignkernels.integrations.verl_engine import SUM_PI_SQUARED, EngineHooks, engine_swaps
from alignkernels.integrations.verl_losses import loss_swaps
from alignkernels.ops._lmhead_engine import HEAD_PRECISIONS
from alignkernels.ops.linear_logprobs import linear_logprobs
from alignkernels.ops.token_logprobs import token_logprobs
from alignkernels.ops.vocab_parallel import gather_lm_head, vocab_parallel_linear_logprobs

__all__ = [
    "apply",
    "remove",
    "is_applied",
    "adapter_calls",
    "worker_setup",
    "apply_from_env",
    "Patch",
    "Options",
    "options",
    "FusedLinearForPPO",
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "linear_cross_entropy",
    "ENV_SWITCH",
]

# backends both token_logprobs and linear_logprobs have
HEAD_BACKENDS = ("auto", "triton", "torch", "reference")
ENV_SWITCH = "ALIGNKERNELS_VERL"


@dataclass(frozen=True)
class Options:
    """What :func:`apply` was asked for (the last call wins)."""

    backend: str = "auto"
    chunk_size: int | None = None  # token rows per logits tile (None: the op default)
    vocab_block_size: int | None = None  # vocabulary columns per tile (None: the op default)
    linear_cross_entropy: bool = True  # rebind verl's Triton linear_cross_entropy too
    losses: bool = False  # swap the policy-loss registry, agg_loss, kl_penalty, compute_value_loss (verl_losses.py)
    batch_invariant: bool = False  # every seam's op with batch_invariant=True
    head_precision: str = "input"  # the fused seams' linear_logprobs(head_precision=)


_STATE = DropIn("verl", Options())
_HANDLE = Patch(_STATE)


def adapter_calls() -> int:
    """How many times verl called one of this module's replacements since the last :func:`apply`
    that patched verl: a check that a run really uses alignkernels."""
    return _STATE.calls


def options() -> Options:
    """The options in effect (those of the last :func:`apply`)."""
    return _STATE.options


_count = _STATE.count
logger = logging.getLogger("alignkernels.integrations.verl")


def _logits_options(seam: str) -> dict:
    """The options of the logits seams' ``token_logprobs`` call; ``head_precision`` cannot reach them
    (the model's lm_head already made the logits): a ``ValueError`` naming the option and the seam."""
    opts = _STATE.options
    if opts.head_precision != "input":
        raise ValueError(
            f"alignkernels.integrations.verl.apply(head_precision={opts.head_precision!r}) cannot reach {seam}: it "
            "gets logits the model's lm_head already computed. Use verl's fused head "
            "(actor_rollout_ref.model.use_fused_kernels=True), or apply() without head_precision"
        )
    return dict(backend=opts.backend, batch_invariant=opts.batch_invariant)


def _head_options() -> dict:
    """The options of the fused seams' ``linear_logprobs`` call."""
    opts = _STATE.options
    return dict(backend=opts.backend, chunk_size=opts.chunk_size, vocab_block_size=opts.vocab_block_size,
                batch_invariant=opts.batch_invariant, head_precision=opts.head_precision)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the replacements (verl's signatures)
# ----------------------------------------------------------------------------------------------
def _entropy(logits: torch.Tensor, seam: str) -> torch.Tensor:
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True, **_logits_options(seam))[1]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``verl.utils.torch_functional.logprobs_from_logits`` on :func:`alignkernels.token_logprobs`:
    ``log softmax(logits)[label]``, fp32, shape of ``labels``. ``inplace_backward`` (flash-attn's
    option in verl) is accepted and has no effect: the op never writes into ``logits``."""
    _count()
    return token_logprobs(logits, labels, **_logits_options("logprobs_from_logits"))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``verl.utils.torch_functional.entropy_from_logits``: entropy of ``softmax(logits)`` over the
    last dimension, fp32, differentiable, without materialising the softmax."""
    _count()
    return _entropy(logits, "entropy_from_logits")


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """``verl.utils.torch_functional.entropy_from_logits_with_chunking``: the same entropy (the op is
    already chunked; ``chunk_size`` must be a positive int, as verl's loop needs)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"entropy_from_logits_with_chunking: chunk_size must be a positive int, got {chunk_size!r}")
    _count()
    return _entropy(logits, "entropy_from_logits_with_chunking")


class FusedLinearForPPO(torch.nn.Module):
    """``verl.utils.experimental.torch_functional.FusedLinearForPPO`` on :func:`alignkernels.linear_logprobs`.

    ``forward(hidden_states [..., H], vocab_weights [V, H], input_ids [...], temperature=1.0)`` →
    ``(log_probs, entropy)``, both fp32 of ``input_ids``' shape: ``log softmax(h·Wᵀ / T)[id]`` and
    the entropy of that distribution, differentiable w.r.t. ``hidden_states`` and ``vocab_weights``
    through both. ``chunk_size`` and ``impl_backend`` are verl's constructor arguments (validated as
    verl does; the tile comes from ``apply(chunk_size=, vocab_block_size=)``). Under autocast both
    operands are cast to the autocast dtype, as verl's matmul does. A DTensor
    ``vocab_weights`` (FSDP2 lm_head as its own unit) is gathered first, its gradient averaged back
    to the shards like FSDP2's."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0, *, return_sum_pi_squared=False):
        """``return_sum_pi_squared=True`` adds a third output, Σπ² = Σ_v softmax(h·Wᵀ / T)_v² of
        ``input_ids``' shape (fp32, no gradient): what verl's logits path computes with
        ``verl.utils.torch_functional.calculate_sum_pi_squared_from_logits`` on the scaled logits, here
        from the same logits tiles (``linear_logprobs(..., return_stats=True)``, ``exp(log_sum_sq_probs)``)."""
        if not isinstance(return_sum_pi_squared, bool):
            raise TypeError(f"FusedLinearForPPO: return_sum_pi_squared must be a bool, got {return_sum_pi_squared!r}")
        _count()
        # verl's model forward never passes return_sum_pi_squared: the swapped engine asks through
        # SUM_PI_SQUARED (alignkernels/integrations/verl_engine.py) and takes the value from there
        stats = return_sum_pi_squared or SUM_PI_SQUARED.wanted
        weight, _ = gather_lm_head(vocab_weights, None, grad_reduce="avg")
        hidden_states, weight = _autocast_operands(hidden_states, weight)
        out = linear_logprobs(hidden_states, weight, input_ids, temperature=temperature, return_entropy=True,
                              return_stats=stats, **_head_options())  # fmt: skip
        if not stats:
            return out
        sum_pi_squared = out.log_sum_sq_probs.exp()
        if return_sum_pi_squared:
            return out.logp, out.entropy, sum_pi_squared
        SUM_PI_SQUARED.put(sum_pi_squared)
        return out.logp, out.entropy


_REDUCTIONS = ("none", "sum", "mean")


def _autocast_operands(hidden, weight):
    """Under autocast verl's ``hidden @ weight.T`` runs in the autocast dtype whatever the two dtypes
    are (an fp32 lm_head with bf16 hidden states under verl's mixed precision): cast both the same way,
    so the op's GEMMs take what verl's matmul takes (the tile itself stays fp32)."""
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return hidden, weight
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.is_floating_point() and weight.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` on :func:`alignkernels.linear_logprobs`.

    ``hidden [..., H]``, ``weight [V, H]``, ``labels [...]`` → ``(logprobs, entropy)``, flattened to
    ``[N]`` as verl's kernel returns them; ``reduction="sum"`` / ``"mean"`` reduces the log-probs to a
    scalar (the entropy stays per token), as verl's. ``dist_process_group`` of one rank (or None) is
    the single-device op; with several ranks (Megatron tensor parallel) ``weight`` is this rank's
    ``[V/W, H]`` vocabulary shard and the call is the vocab-parallel op: see the module docstring."""
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    group_size = 1
    if dist_process_group is not None:
        import torch.distributed as dist

        group_size = dist.get_world_size(dist_process_group)
    _count()
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if isinstance(labels, torch.Tensor):
        labels = labels.reshape(-1)
    hidden, weight = _autocast_operands(hidden, weight)
    if group_size == 1:
        logp, entropy = linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                        **_head_options())  # fmt: skip
    else:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: weight must be a tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"linear_cross_entropy: weight must be this rank's [V/W, H] vocabulary shard (2-D), "
                             f"got shape {tuple(weight.shape)}")  # fmt: skip
        shard = weight.shape[0]  # verl's layout: equal shards, rank k holds the ids [k·shard, (k+1)·shard)
        logp, entropy = vocab_parallel_linear_logprobs(
            hidden, weight, labels, vocab_start=dist.get_rank(dist_process_group) * shard,
            vocab_size=group_size * shard, process_group=dist_process_group, temperature=temperature,
            return_entropy=True, grad_hidden="partial", **_head_options(),
        )  # fmt: skip
    reduction = reduction.lower()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


# ----------------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------------
def is_applied() -> bool:
    """Whether :func:`apply` is in effect."""
    return _STATE.applied


def _import_verl():
    try:
        torch_functional = importlib.import_module("verl.utils.torch_functional")
        experimental = importlib.import_module("verl.utils.experimental.torch_functional")
        kernel = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as e:
        raise ImportError(f"alignkernels.integrations.verl needs verl (tested with 0.9.1) importable: {e}") from e
    try:  # resolves verl's platform (verl.utils.device): select it (VERL_PLATFORM) before apply()
        engine = importlib.import_module("verl.workers.engine.fsdp.transformer_impl")
    except ImportError as e:  # no FSDP engine to swap: its methods stay verl's (two passes on the logits seams)
        logger.info("alignkernels: verl's FSDP engine not importable, its methods stay stock: %s", e)
        engine = None
    return torch_functional, experimental, kernel, core_algos, engine


_LOSS_LOG = {}  # "swapped" / "stock": the policy-loss names of the last losses=True swaps


def _loss_backend() -> str:
    return _STATE.options.backend


def _swaps(opts: Options) -> list[Swap]:
    torch_functional, experimental, kernel, core_algos, engine = _import_verl()
    pairs = [
        (torch_functional, "logprobs_from_logits", logprobs_from_logits),
        (torch_functional, "entropy_from_logits", entropy_from_logits),
        (torch_functional, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking),
        (experimental, "FusedLinearForPPO", FusedLinearForPPO),
    ]
    if opts.linear_cross_entropy:
        pairs.append((kernel, "linear_cross_entropy", linear_cross_entropy))
    swaps = []
    for module, name, replacement in pairs:
        original = vars(module).get(name)
        if original is None:
            raise ImportError(f"alignkernels.integrations.verl: {module.__name__}.{name} not found (verl 0.9.1 has it)")
        if original is replacement:  # already ours (a verl module reloaded while applied): nothing to swap
            continue
        swaps.append(Swap(original, replacement))
    if engine is not None:
        swaps += engine_swaps(engine, EngineHooks(logits_options=_logits_options, count=_count))
    if opts.losses:
        loss, swapped, stock = loss_swaps(core_algos, _loss_backend, _count)
        swaps += loss
        _LOSS_LOG.update(swapped=swapped, stock=stock)
    return swaps


def _check_options(backend, chunk_size, vocab_block_size, linear_cross_entropy, losses, batch_invariant,
                   head_precision) -> Options:  # fmt: skip
    for name, value in (("losses", losses), ("batch_invariant", batch_invariant)):
        if not isinstance(value, bool):
            raise TypeError(f"apply(): {name} must be a bool, got {value!r}")
    if not isinstance(head_precision, str) or head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"apply(): head_precision must be one of {tuple(HEAD_PRECISIONS)}, got {head_precision!r}")
    if batch_invariant and backend == "reference":
        raise ValueError("apply(): batch_invariant=True is not implemented on backend='reference' (token_logprobs and "
                         "linear_logprobs, every verl seam): use 'auto', 'triton' or 'torch'")  # fmt: skip
    if not isinstance(backend, str) or backend not in HEAD_BACKENDS:
        raise ValueError(f"apply(): backend must be one of {HEAD_BACKENDS}, got {backend!r}")
    for name, value in (("chunk_size", chunk_size), ("vocab_block_size", vocab_block_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"apply(): {name} must be a positive int or None, got {value!r}")
        if value is not None and value <= 0:
            raise ValueError(f"apply(): {name} must be a positive int or None, got {value!r}")
    if not isinstance(linear_cross_entropy, bool):
        raise TypeError(f"apply(): linear_cross_entropy must be a bool, got {linear_cross_entropy!r}")
    return Options(backend, chunk_size, vocab_block_size, linear_cross_entropy, losses, batch_invariant, head_precision)


def apply(
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    linear_cross_entropy: bool = True,
    losses: bool = False,
    batch_invariant: bool = False,
    head_precision: str = "input",
) -> Patch:
    """Make verl compute its LM-head log-probs and entropies with alignkernels (see the module docstring).

    Call in the process that builds the actor engine, before building it (in a Ray worker: use
    :func:`worker_setup` or the ``verl.plugins`` entry point). Idempotent; the options of the last
    call win (a call that changes ``linear_cross_entropy`` or ``losses`` re-installs). A failed call
    (bad option, verl missing) leaves verl as it was.

    Args:
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"`` (of ``token_logprobs`` and
            ``linear_logprobs``).
        chunk_size, vocab_block_size: token rows and vocabulary columns of the fused head's logits
            tile (``None``: the op defaults).
        linear_cross_entropy: also rebind verl's Triton ``linear_cross_entropy``.
        losses: also swap verl's losses (:mod:`alignkernels.integrations.verl_losses`): every
            ``POLICY_LOSS_REGISTRY`` entry alignkernels matches exactly (in place; the others stay
            stock and are named in the INFO log line), ``agg_loss``, ``kl_penalty`` and
            ``compute_value_loss``.
        batch_invariant: every seam computes each token's log-prob and entropy bitwise independently
            of the batch around it (``token_logprobs`` / ``linear_logprobs(batch_invariant=True)``;
            backends ``auto``, ``triton``, ``torch``; ``reference`` is refused).
        head_precision: ``"input"``, ``"fp32"`` or ``"tf32"``: the fused seams' GEMM operands
            (``FusedLinearForPPO``, ``linear_cross_entropy``). The logits seams cannot honour a value
            other than ``"input"`` (the logits exist already): they raise ``ValueError`` when called.

    Returns a :class:`Patch` (``.remove()``, context manager).
    """
    options = _check_options(backend, chunk_size, vocab_block_size, linear_cross_entropy, losses, batch_invariant,
                             head_precision)  # fmt: skip
    if _STATE.applied and (_STATE.options.linear_cross_entropy, _STATE.options.losses) != (
            options.linear_cross_entropy, options.losses):  # fmt: skip
        remove()
    before = _STATE.rebinding
    _STATE.install(lambda: _swaps(options), options)
    if options.losses and _STATE.rebinding is not before:
        logger.info("alignkernels: verl losses swapped: POLICY_LOSS_REGISTRY %s, agg_loss, kl_penalty, "
                    "compute_value_loss; left stock: %s",
                    ", ".join(_LOSS_LOG["swapped"]), ", ".join(_LOSS_LOG["stock"]) or "none")  # fmt: skip
    return _HANDLE


def remove() -> None:
    """Undo :func:`apply`: every verl name bound to a replacement gets its original back (modules
    imported after :func:`apply` included). Engines built while applied keep the functions they
    captured (the FSDP engine's compiled entropy function)."""
    _STATE.remove()


def apply_from_env(*, required: bool = False) -> Patch | None:
    """Apply with options read from the environment (``ALIGNKERNELS_VERL_BACKEND``,
    ``ALIGNKERNELS_VERL_CHUNK_SIZE``, ``ALIGNKERNELS_VERL_VOCAB_BLOCK_SIZE``,
    ``ALIGNKERNELS_VERL_LINEAR_CROSS_ENTROPY``, ``ALIGNKERNELS_VERL_LOSSES``,
    ``ALIGNKERNELS_VERL_BATCH_INVARIANT``, ``ALIGNKERNELS_VERL_HEAD_PRECISION``) when ``ALIGNKERNELS_VERL``
    is on, or when ``required`` and it is not explicitly off. Returns the patch, or ``None`` when
    nothing was applied. A bad value is a ``ValueError`` naming the variable."""
    switch = env_switch(ENV_SWITCH)
    if not (switch or (required and switch is None)):
        return None
    lce = env_switch(ENV_SWITCH + "_LINEAR_CROSS_ENTROPY")
    return apply(
        backend=env_choice(ENV_SWITCH + "_BACKEND", HEAD_BACKENDS, "auto"),
        chunk_size=env_positive_int(ENV_SWITCH + "_CHUNK_SIZE"),
        vocab_block_size=env_positive_int(ENV_SWITCH + "_VOCAB_BLOCK_SIZE"),
        linear_cross_entropy=True if lce is None else lce,
        losses=bool(env_switch(ENV_SWITCH + "_LOSSES")),
        batch_invariant=bool(env_switch(ENV_SWITCH + "_BATCH_INVARIANT")),
        head_precision=env_choice(ENV_SWITCH + "_HEAD_PRECISION", tuple(HEAD_PRECISIONS), "input"),
    )


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: ``runtime_env={"worker_process_setup_hook":
    "alignkernels.integrations.verl.worker_setup"}``. Applies in each worker (options from the
    environment, see :func:`apply_from_env`) unless ``ALIGNKERNELS_VERL=0``."""
    apply_from_env(required=True)
