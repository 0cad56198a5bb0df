"""verl's FSDP engine on alignkernels: the engine-method swaps of ``alignkernels.integrations.verl.apply()``.

verl 0.9.1's ``FSDPEngineWithLMHead`` (``verl/workers/engine/fsdp/transformer_impl.py``) turns the model
output into per-token outputs in ``prepare_model_outputs``. Two of its methods are swapped on the class
(class attributes, rebound and restored by :mod:`alignkernels.integrations.rebind`; subclasses that do
not override them, such as verl's own, follow; ``FSDPEngineWithValueHead`` overrides it and stays stock):

- ``prepare_model_outputs`` → :func:`engine_swaps`' replacement. **Logits path** (``use_fused_kernels``
  off): log-prob and entropy in **one** :func:`alignkernels.token_logprobs` ``(..., return_entropy=True)``
  pass over the temperature-scaled logits, where verl makes two passes (``logprobs_from_logits`` and the
  compiled ``entropy_from_logits``; on the padded path the entropy even runs over the padded
  ``[B, L, V]`` logits). Both layouts are reproduced: remove-padding (the packed row, verl's static pad
  stripped as ``_gather_and_unpad_packed`` does) and padded (the valid positions of ``[B, L, V]``, row
  by row, as verl's ``narrow`` + ``cat``); temperature scaling as verl's ``_scale_logits_by_temperature``
  (per-token temperatures, clamped at 1e-8, skipped for a scalar 1); ``calculate_entropy=False`` gives
  the log-prob alone. Σπ² (``calculate_sum_pi_squared``) stays verl's own
  ``calculate_sum_pi_squared_from_logits`` on the logits path: ``token_logprobs`` has no statistics
  form. Everything else (Ulysses sequence parallel > 1, distillation, ``entropy_checkpointing``, a
  ``pad_mode`` other than no-padding) runs verl's method unchanged, i.e. two passes, still on
  alignkernels' logits seams. **Fused path** (``use_fused_kernels``) with ``calculate_sum_pi_squared``:
  verl refuses it (``NotImplementedError``: its fused kernels have no Σπ²); here Σπ² comes from the
  fused head's own logits tiles (:class:`alignkernels.integrations.verl.FusedLinearForPPO`,
  ``return_sum_pi_squared``), laid out as the log-probs (same key ``sum_pi_squared``, nested
  ``[B, j]``), and verl's method does the rest.
- ``forward_step`` → verl's, run inside :data:`SUM_PI_SQUARED`'s scope when the micro-batch asks for
  Σπ² on the fused path: verl's model forward (``dense_common.forward_with_torch_backend`` and the VLM
  forwards) calls ``FusedLinearForPPO`` without a Σπ² argument, so the head reads the request from the
  scope and leaves Σπ² there for ``prepare_model_outputs``. A fused forward that does not go through
  ``FusedLinearForPPO`` (the Triton ``impl_backend``) leaves nothing: a ``NotImplementedError`` that says
  so, never a missing key.

Numerics: the one pass gives the same values as the two (the entropy does not depend on the labels;
the log-prob is the op's either way); gradients flow into the logits once, through one backward,
instead of two summed ones (fp32: ~1e-7 apart). Σπ² of the fused head is fp32 without gradient
(verl uses it under ``no_grad``: the optimal-token-baseline advantage and its metrics).
Memory: the one pass holds O(chunk x V) beyond the logits; verl's stock entropy a full softmax.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch

from alignkernels.integrations.rebind import Swap
from alignkernels.ops.token_logprobs import token_logprobs

__all__ = ["SumPiSquaredRequest", "SUM_PI_SQUARED", "EngineHooks", "MicroBatchFlags", "engine_swaps"]


class SumPiSquaredRequest:
    """Σπ² asked of the fused head for the micro-batch the engine is running (the side channel between
    the swapped ``forward_step``, the head inside verl's model forward and ``prepare_model_outputs``)."""

    def __init__(self):
        self.wanted = False
        self.value: torch.Tensor | None = None

    @contextmanager
    def scope(self, wanted: bool):
        """Ask for Σπ² (``wanted``) for the duration; anything left over is dropped on exit."""
        self.wanted, self.value = wanted, None
        try:
            yield self
        finally:
            self.wanted, self.value = False, None

    def put(self, value: torch.Tensor) -> None:
        self.value = value

    def take(self) -> torch.Tensor:
        """The Σπ² the head left; ``NotImplementedError`` when the fused forward did not compute one."""
        value, self.value = self.value, None
        if value is None:
            raise NotImplementedError(
                "calculate_sum_pi_squared=True with use_fused_kernels=True: alignkernels computes Σπ² in "
                "FusedLinearForPPO (fused_kernel_options.impl_backend='torch'), and this forward did not go "
                "through it (impl_backend='triton', or an engine that overrides forward_step)"
            )
        return value


SUM_PI_SQUARED = SumPiSquaredRequest()


class EngineHooks(NamedTuple):
    """What the swapped methods take from :mod:`alignkernels.integrations.verl`."""

    logits_options: Callable[[str], dict]  # the logits seams' token_logprobs options (raises on a bad one)
    count: Callable[[], None]  # one adapter call


class MicroBatchFlags(NamedTuple):
    """The engine switches ``prepare_model_outputs`` reads from a micro-batch's non-tensor data (verl's defaults)."""

    remove_padding: bool
    no_padding: bool  # pad_mode is DatasetPadMode.NO_PADDING
    fused: bool
    entropy: bool
    sum_pi_squared: bool
    distillation: bool  # distillation_use_topk or distillation_only

    @classmethod
    def read(cls, micro_batch, tu, pad_modes) -> "MicroBatchFlags":
        get = lambda key, default: tu.get_non_tensor_data(data=micro_batch, key=key, default=default)  # noqa: E731
        return cls(
            remove_padding=bool(get("use_remove_padding", True)),
            no_padding=get("pad_mode", pad_modes.NO_PADDING) == pad_modes.NO_PADDING,
            fused=bool(get("use_fused_kernels", False)),
            entropy=bool(get("calculate_entropy", False)),
            sum_pi_squared=bool(get("calculate_sum_pi_squared", False)),
            distillation=bool(get("distillation_use_topk", False) or get("distillation_only", False)),
        )


def _scale(logits, temperature, unit: bool):
    """verl's ``_scale_logits_by_temperature`` (``verl/workers/engine/fsdp/transformer_impl.py``)."""
    return logits if unit else logits / temperature.clamp(min=1e-8).to(logits.dtype)


def _full(logits):
    from torch.distributed.tensor import DTensor

    return logits.full_tensor() if isinstance(logits, DTensor) else logits  # tensor-parallel logits, as verl


@contextmanager
def _flag_off(micro_batch, tu, key: str):
    """``key`` of the micro-batch's non-tensor data set to False for the duration (then True again)."""
    tu.assign_non_tensor(micro_batch, **{key: False})
    try:
        yield
    finally:
        tu.assign_non_tensor(micro_batch, **{key: True})


def engine_swaps(transformer_impl, hooks: EngineHooks) -> list[Swap]:
    """The swaps of ``FSDPEngineWithLMHead.prepare_model_outputs`` and ``.forward_step`` on the loaded
    ``verl.workers.engine.fsdp.transformer_impl`` module (see the module docstring)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode

    cls = transformer_impl.FSDPEngineWithLMHead
    stock_outputs = vars(cls)["prepare_model_outputs"]
    stock_step = vars(cls)["forward_step"]

    def forward_step(self, micro_batch, loss_function, forward_only):
        flags = MicroBatchFlags.read(micro_batch, tu, DatasetPadMode)
        with SUM_PI_SQUARED.scope(flags.fused and flags.sum_pi_squared):
            return stock_step(self, micro_batch, loss_function, forward_only)

    def one_pass(logits, labels, entropy: bool):
        hooks.count()
        return token_logprobs(logits, labels, return_entropy=entropy, **hooks.logits_options("prepare_model_outputs"))

    def fused_sum_pi_squared(self, output, output_args, micro_batch, logits_processor_func, flags):
        value = SUM_PI_SQUARED.take()
        with _flag_off(micro_batch, tu, "calculate_sum_pi_squared"):  # verl's refusal; the rest is verl's
            model_output = stock_outputs(self, output, output_args, micro_batch, logits_processor_func)
        cu_seqlens = micro_batch["input_ids"].offsets()
        if flags.remove_padding:  # as verl lays out the fused log-probs
            value = self._gather_and_unpad_packed(value.reshape(-1), output_args["pad_size"])
        else:
            arange = torch.arange(value.shape[1], device=value.device)
            value = value[arange < cu_seqlens.diff().unsqueeze(1)]
        model_output["sum_pi_squared"] = torch.nested.nested_tensor_from_jagged(value, cu_seqlens)
        return model_output

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        flags = MicroBatchFlags.read(micro_batch, tu, DatasetPadMode)
        if flags.fused:
            if flags.sum_pi_squared:
                return fused_sum_pi_squared(self, output, output_args, micro_batch, logits_processor_func, flags)
            return stock_outputs(self, output, output_args, micro_batch, logits_processor_func)
        if (flags.distillation or not flags.no_padding or getattr(self, "use_ulysses_sp", False)
                or (flags.entropy and self.engine_config.entropy_checkpointing)):  # fmt: skip
            return stock_outputs(self, output, output_args, micro_batch, logits_processor_func)
        unit = output_args.get("temperature_is_one", False)
        cu_seqlens = micro_batch["input_ids"].offsets()
        sum_pi_squared = None
        if flags.remove_padding:
            logits = _scale(_full(output.logits.squeeze(0)), output_args["temperature_rmpad"].unsqueeze(-1), unit)
            if flags.sum_pi_squared:
                sum_pi_squared = transformer_impl.verl_F.calculate_sum_pi_squared_from_logits(logits)
            outs = one_pass(logits, output_args["input_ids_rmpad_rolled"], flags.entropy)
            outs = outs if flags.entropy else (outs,)
            if sum_pi_squared is not None:
                outs = (*outs, sum_pi_squared)
            outs = [self._gather_and_unpad_packed(x, output_args["pad_size"]) for x in outs]
        else:
            logits = _scale(_full(output.logits), output_args["temperature"].unsqueeze(-1).unsqueeze(-1), unit)
            arange = torch.arange(logits.shape[1], device=logits.device)
            valid = arange < cu_seqlens.diff().unsqueeze(1)  # [B, L]: verl's narrow(...) rows, in order
            if flags.sum_pi_squared:
                sum_pi_squared = transformer_impl.verl_F.calculate_sum_pi_squared_from_logits(logits)[valid]
            outs = one_pass(logits[valid], output_args["input_ids_rmpad_rolled"], flags.entropy)
            outs = outs if flags.entropy else (outs,)
            if sum_pi_squared is not None:
                outs = (*outs, sum_pi_squared)
        outs = [torch.nested.nested_tensor_from_jagged(x, cu_seqlens) for x in outs]
        keys = ["log_probs"] + ["entropy"] * flags.entropy + ["sum_pi_squared"] * flags.sum_pi_squared
        return dict(zip(keys, outs))

    return [Swap(stock_outputs, prepare_model_outputs, owners=(cls,)), Swap(stock_step, forward_step, owners=(cls,))]
