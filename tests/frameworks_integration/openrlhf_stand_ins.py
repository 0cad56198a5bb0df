"""What OpenRLHF 0.11.2's training step needs on a CPU-only machine, for the tests in this folder.

- ``flash_attn``: imported at module level by ``openrlhf/models/ring_attn_utils.py`` (used only by the
  packed / ring-attention path), and ``vllm``: imported by ``openrlhf/trainer/ray/vllm_engine.py``
  (through ``openrlhf/trainer/ray/__init__.py``; used only for generation). :func:`stand_in_modules`
  puts empty modules under those names in ``sys.modules`` for the import — their functions raise
  if anything calls them — and takes them out again afterwards.
- The DeepSpeed strategy (``openrlhf.utils.deepspeed.DeepspeedStrategy``) calls CUDA in
  ``setup_distributed`` and wraps the model in a DeepSpeed engine: :class:`CPUStrategy` is the
  surface ``ActorPPOTrainer.training_step`` calls (``backward``, ``optimizer_step``,
  ``get_grad_norm``, ``ring_attn_group``, ``args``) on one process, with a plain torch optimizer;
  :class:`EngineStrategy` the same around a real ``DeepSpeedEngine`` (one gloo rank), with
  OpenRLHF's own ``backward`` / ``optimizer_step`` / ``get_grad_norm``.
- ``openrlhf.trainer.ray.ppo_actor`` binds ``torch_dist_barrier_and_cuda_sync`` by name and calls it
  in ``ActorPPOTrainer.__init__`` (a ``torch.distributed`` barrier and ``torch.cuda.synchronize``):
  :func:`import_ppo_actor` rebinds it there to a no-op (one process, no CUDA stream to wait for),
  and ``NaiveReplayBuffer`` (its ``__init__`` asks ``torch.cuda.current_device()``) to
  :func:`cpu_replay_buffer`'s subclass, whose target device is the CPU.

:func:`ppo_args` is the part of ``openrlhf/cli/train_ppo_ray.py``'s argument tree the training step
reads, at that file's defaults unless overridden.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

STAND_INS = {
    "flash_attn": (),
    "flash_attn.bert_padding": ("index_first_axis", "pad_input", "rearrange", "unpad_input"),
    "flash_attn.utils": (),
    "flash_attn.utils.distributed": ("all_gather",),
    "vllm": ("SamplingParams", "LLM"),
    "vllm.inputs": ("TokensPrompt",),
    "vllm.utils": ("random_uuid",),
}


def _not_available(*args, **kwargs):
    raise RuntimeError("stand-in module of tests/frameworks_integration/openrlhf_stand_ins.py: not available")


@contextlib.contextmanager
def stand_in_modules(names=tuple(STAND_INS)):
    """Empty modules for ``names`` (those not importable for real) in ``sys.modules`` inside the block."""
    tops = {name.partition(".")[0] for name in names}
    missing = {top for top in tops if top not in sys.modules and importlib.util.find_spec(top) is None}
    added = []
    for name in names:
        if name.partition(".")[0] not in missing:
            continue  # imported already, or installed: the real one
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []  # a package, so that its stand-in submodules import
        for fn in STAND_INS[name]:
            setattr(module, fn, _not_available)
        sys.modules[name] = module
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def import_ppo_actor():
    """``openrlhf.trainer.ray.ppo_actor`` (and ``openrlhf.models``) imported under the stand-ins, its
    CUDA barrier rebound to a no-op."""
    with stand_in_modules():
        ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    ppo_actor.torch_dist_barrier_and_cuda_sync = lambda: None
    if not getattr(ppo_actor.NaiveReplayBuffer, "cpu_stand_in", False):
        ppo_actor.NaiveReplayBuffer = cpu_replay_buffer(ppo_actor.NaiveReplayBuffer)
    return ppo_actor


def cpu_replay_buffer(base):
    """``base`` (OpenRLHF's ``NaiveReplayBuffer``) with the CPU as its target device."""

    class CPUReplayBuffer(base):
        cpu_stand_in = True

        def __init__(self, *args, **kwargs):
            current_device = torch.cuda.current_device
            torch.cuda.current_device = lambda: 0
            try:
                super().__init__(*args, **kwargs)
            finally:
                torch.cuda.current_device = current_device
            self.target_device = torch.device("cpu")

    return CPUReplayBuffer


def ppo_args(*, entropy_coef=None, kl_use_loss=False, kl_init_coef=0.01, kl_estimator="k1", eps_clip=0.2,
             loss_agg_mode="token-mean", policy_loss_type="ppo") -> SimpleNamespace:  # fmt: skip
    """The fields of OpenRLHF's hierarchical arguments that ``ActorPPOTrainer`` reads in
    ``__init__`` and ``training_step`` (defaults of ``openrlhf/cli/train_ppo_ray.py``)."""
    ns = SimpleNamespace
    return ns(
        train=ns(max_epochs=1, dynamic_batch_enable=False, colocate_all=False, async_enable=False),
        actor=ns(eps_clip_low_high=(eps_clip, eps_clip), dual_clip=None, loss_agg_mode=loss_agg_mode,
                 policy_loss_type=policy_loss_type, aux_loss_coef=0.0, entropy_coef=entropy_coef),
        algo=ns(advantage=ns(is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
                             is_correction_threshold=[0.5, 5.0]),
                kl=ns(use_loss=kl_use_loss, init_coef=kl_init_coef, estimator=kl_estimator, unbiased_gradient=False)),
        ds=ns(packing_samples=False),
        vllm=ns(sync_backend="nccl"),
    )  # fmt: skip


def write_stand_in_packages(root, tops=("flash_attn",)) -> None:
    """The stand-ins of the packages ``tops`` as source files under ``root`` (for processes that
    cannot run :func:`stand_in_modules` first: Ray workers, with ``root`` on their ``PYTHONPATH``)."""
    for name, functions in STAND_INS.items():
        if name.partition(".")[0] not in tops:
            continue
        folder = Path(root, *name.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def {fn}(*args, **kwargs):\n    raise RuntimeError('stand-in {name}.{fn}: not available')\n"
                       for fn in functions)  # fmt: skip
        (folder / "__init__.py").write_text(f'"""Stand-in of {name} (tests/frameworks_integration/openrlhf_stand_ins.py)."""\n' + body)


class CPUStrategy:
    """``DeepspeedStrategy``'s training-step surface on one CPU process: ``backward`` is
    ``loss.backward()``; ``optimizer_step`` records the gradient norm (DeepSpeed's
    ``get_global_grad_norm``, before clipping; no clipping here), steps, zeroes the gradients and steps
    the scheduler, as the DeepSpeed engine's ``step`` does."""

    ring_attn_group = None

    def __init__(self, args):
        self.args = args
        self.grad_norm = 0.0

    def backward(self, loss, model, optimizer, **kwargs):
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def get_grad_norm(self, model):
        return self.grad_norm


class EngineStrategy(CPUStrategy):
    """For an ``Actor`` whose ``model`` is a ``DeepSpeedEngine`` (what OpenRLHF's strategy makes of it):
    OpenRLHF's own ``DeepspeedStrategy.backward`` / ``optimizer_step`` / ``get_grad_norm``
    (``engine.backward``, ``engine.step``, ``engine.get_global_grad_norm``)."""

    def backward(self, loss, model, optimizer, **kwargs):
        from openrlhf.utils.deepspeed import DeepspeedStrategy

        DeepspeedStrategy.backward(self, loss, model, optimizer)

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        from openrlhf.utils.deepspeed import DeepspeedStrategy

        DeepspeedStrategy.optimizer_step(self, optimizer, model, scheduler, name=name)

    def get_grad_norm(self, model):
        from openrlhf.utils.deepspeed import DeepspeedStrategy

        return DeepspeedStrategy.get_grad_norm(self, model)
