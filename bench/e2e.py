"""``python -m bench --e2e``: one training step of a small Qwen2-style model (from a config, no
download) under GRPO and DPO -- eager full logits vs stock TRL (its own fused lm-head) vs TRL with
``alignkernels.integrations.trl.apply()``: step time and peak memory (:func:`e2e_step_benchmark`);
and, where verl is installed, one step of verl's FSDP2 engine, stock vs ``alignkernels.integrations.verl.apply()``
(logits path and fused head: ``bench/e2e_verl.py``).

GPU: ``torch.cuda.max_memory_allocated``. CPU: each (trainer, mode) runs in a fresh process and
reports its peak RSS (the model and inputs included, identical across modes).
Writes ``bench/results/<device>/e2e.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .e2e_verl import VERL_MODES

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
E2E_MODES = ("eager", "trl", "alignkernels")


def e2e_model(config_kwargs: dict, device, dtype, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**config_kwargs)
    return transformers.Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def e2e_step_benchmark(
    trainer: str = "grpo",
    *,
    modes=E2E_MODES,
    batch_size: int = 1,
    seq_len: int = 8192,
    prompt_len: int | None = None,
    hidden_size: int = 896,
    intermediate_size: int = 4864,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 14,
    num_key_value_heads: int = 2,
    vocab_size: int = 151936,
    device=None,
    dtype=None,
    steps: int = 3,
    warmup: int = 1,
    gradient_checkpointing: bool = True,
    seed: int = 0,
):
    """One training step of a small Qwen2-style model (built from a config) under GRPO or DPO.

    ``trainer``: ``"grpo"`` (policy log-probs + entropy of ``batch_size`` sequences, TRL's DAPO
    token-level clipped surrogate with ``beta=0``) or ``"dpo"`` (``batch_size`` chosen + rejected
    pairs, reference log-probs from a frozen copy under ``no_grad``, sigmoid loss). Modes:

    - ``"eager"``: the model's own forward (full ``[B, T, V]`` logits) + fp32 ``log_softmax``:
      what TRL < 1.16 and most training code do;
    - ``"trl"``: stock TRL >= 1.16, ``add_fused_lm_head`` with its ``ChunkedLogProbFunction``;
    - ``"alignkernels"``: the same after ``alignkernels.integrations.trl.apply()``.

    Each step is forward + loss + backward + ``SGD.step`` (no optimizer state, so peak memory is
    weights + grads + activations). Defaults: Qwen2.5-0.5B widths, 2 layers, 8k tokens, bf16 on CUDA
    (fp32 on CPU), gradient checkpointing on (as in long-sequence RL runs), completions = the second
    half of each sequence. Returns one dict per mode: ``trainer, mode, device, dtype, batch_size,
    seq_len, step_time_s`` (median of ``steps`` after ``warmup``), ``peak_memory_bytes``
    (``torch.cuda.max_memory_allocated`` over the measured steps; ``None`` off CUDA: measure RSS
    in a subprocess there) and ``loss`` (first measured step; modes agree up to bf16 rounding).
    The patch is switched per mode, so it must not be applied when this is called; it is removed
    again on return.
    """
    from trl.trainer.utils import add_fused_lm_head

    from alignkernels.integrations.trl import apply, is_applied, remove

    if trainer not in ("grpo", "dpo"):
        raise ValueError(f"trainer must be 'grpo' or 'dpo', got {trainer!r}")
    for mode in modes:
        if mode not in E2E_MODES:
            raise ValueError(f"modes must be among {E2E_MODES}, got {mode!r}")
    if is_applied():
        raise RuntimeError("alignkernels.integrations.trl is applied: call remove() first (each mode sets it)")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompt_len = seq_len // 2 if prompt_len is None else prompt_len
    config_kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max(seq_len, 32),
        tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    rows = 2 * batch_size if trainer == "dpo" else batch_size
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, seq_len), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    mask = (labels[:, 1:] != -100).float()
    advantages = torch.randn(rows, 1, generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for mode in modes:
        remove()
        model = e2e_model(config_kwargs, device, dtype, seed)
        model.train()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref_model = None
        if trainer == "dpo":
            ref_model = e2e_model(config_kwargs, device, dtype, seed).eval().requires_grad_(False)
        outputs = ("log_probs", "entropy") if trainer == "grpo" else ("log_probs", "entropy", "mean_logits", "is_top1")
        if mode != "eager":
            if mode == "alignkernels":
                apply()
            add_fused_lm_head(model, outputs=outputs)
            if ref_model is not None:
                add_fused_lm_head(ref_model)

        def per_token(m, grad=True):
            with torch.set_grad_enabled(grad):
                if mode == "eager":
                    logits = m(input_ids=input_ids).logits[:, :-1].float()
                    logsm = torch.log_softmax(logits, dim=-1)
                    tgt = labels[:, 1:]
                    logp = logsm.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
                    with torch.no_grad():
                        entropy = -(logsm.exp() * logsm).sum(-1) * mask
                    return logp, entropy
                out = m(input_ids=input_ids, labels=labels, fused_lm_head=True)
                return out.log_probs, out.entropy

        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step():
            logp, entropy = per_token(model)
            if trainer == "grpo":
                ratio = torch.exp(logp - logp.detach())
                clipped = torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
                per_tok = -torch.minimum(ratio * advantages, clipped * advantages)
                loss = (per_tok * mask).sum() / mask.sum().clamp(min=1)
            else:
                with torch.no_grad():
                    ref_logp, _ = per_token(ref_model, grad=False)
                seq = logp.sum(1) - ref_logp.sum(1)
                chosen, rejected = seq.chunk(2)
                loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        for _ in range(warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, first_loss = [], None
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            loss_value = step()
            sync()
            times.append(time.perf_counter() - t0)
            first_loss = loss_value if first_loss is None else first_loss
        results.append(
            dict(
                trainer=trainer, mode=mode, device=str(device), dtype=str(dtype).replace("torch.", ""),
                batch_size=batch_size, seq_len=seq_len, step_time_s=statistics.median(times),
                peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                loss=first_loss,
            )  # fmt: skip
        )
        del model, ref_model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    remove()
    return results


def run_one(trainer: str, mode: str, seq_len: int, batch_size: int, vocab_size: int, device: str, steps: int) -> dict:
    if trainer == "verl":
        from .e2e_verl import verl_step_benchmark

        row = verl_step_benchmark(mode, seq_len=seq_len, batch_size=batch_size, vocab_size=vocab_size, device=device,
                                  steps=steps, warmup=1)  # fmt: skip
    else:
        (row,) = e2e_step_benchmark(trainer, modes=(mode,), seq_len=seq_len, batch_size=batch_size,
                                    vocab_size=vocab_size, device=device, steps=steps, warmup=1)  # fmt: skip
    if row.get("peak_memory_bytes") is None:
        row["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["memory_kind"] = "peak RSS of the process"
    else:
        row.setdefault("memory_kind", "torch.cuda.max_memory_allocated")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --e2e", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default="grpo,dpo" + (",verl" if importlib.util.find_spec("verl") else ""))
    p.add_argument("--modes", default="eager,trl,alignkernels", help="modes of the TRL trainers (grpo, dpo)")
    p.add_argument("--verl-modes", default=",".join(VERL_MODES), help="modes of the verl engine step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=None, help="default 151936 on GPU, 32000 on CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("TRAINER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    seq_len = args.seq_len or (8192 if device == "cuda" else 1024)
    vocab = args.vocab_size or (151936 if device == "cuda" else 32000)
    if args.worker:
        print(json.dumps(run_one(*args.worker, seq_len, args.batch_size, vocab, device, args.steps), default=str))
        return 0

    from rich.console import Console
    from rich.table import Table

    from .environment import capture, device_name, device_slug

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    rows = []
    for trainer in args.trainers.split(","):
        for mode in (args.verl_modes if trainer == "verl" else args.modes).split(","):
            with console.status(f"{trainer} / {mode}: one step at seq_len={seq_len}, V={vocab} on {device}"):
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "bench.e2e", "--worker", trainer, mode, "--seq-len", str(seq_len),
                       "--batch-size", str(args.batch_size), "--vocab-size", str(vocab), "--steps",
                       str(args.steps), "--device", device]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
                rows.append(dict(trainer=trainer, mode=mode, status="OOM" if oom else "error",
                                 error=proc.stderr.strip().splitlines()[-1:] or ["?"]))  # fmt: skip
                console.print(f"{trainer}/{mode}: {rows[-1]['status']} {rows[-1]['error'][0]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(status="ok", wall_s=time.perf_counter() - t0)
            rows.append(row)

    table = Table(title=f"One training step, seq_len={seq_len}, V={vocab}, {device_name(torch.device(device))}")
    for col in ("trainer", "mode", "step time", "peak memory", "memory vs stock TRL / verl", "memory vs eager"):
        table.add_column(col)
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["trainer"], r["mode"], r["status"], "", "", "")
            continue
        ref = {m["mode"]: m for m in rows if m["trainer"] == r["trainer"] and m["status"] == "ok"}
        ratio = lambda base: f"{r['peak_memory_bytes'] / ref[base]['peak_memory_bytes']:.2f}x" if base in ref else "-"  # noqa: E731
        table.add_row(r["trainer"], r["mode"], f"{r['step_time_s'] * 1e3:.0f} ms",
                      f"{r['peak_memory_bytes'] / 2**20:.0f} MiB", ratio("verl" if r["trainer"] == "verl" else "trl"),
                      ratio("eager"))  # fmt: skip
    console.print(table)
    out = args.out or RESULTS_ROOT / device_slug(torch.device(device)) / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(capture(torch.device(device)), seq_len=seq_len, vocab_size=vocab)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + "\n")
    console.print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
