"""What the programs (``demo``, ``demo --serve``, ``demo --tp``) share: option errors and checks, the
dtype names and tolerances of the self-checks, a progress bar, device sync, greedy generation."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..models.hybrid import HybridLM

# Largest allowed |cached - recomputed| logit difference, by model dtype.
# float32 paths differ only in summation order (observed ~1.4e-6 on logits of
# size ~3); half precision rounds every activation (observed on the default
# model, CPU: bfloat16 8e-3 to 1.6e-2, float16 2e-3).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.02}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OptionError(Exception):
    """A bad option: reported as one line, exit code 2."""


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each option ``--name`` (attribute ``name``) must be at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_model_options(args: argparse.Namespace) -> torch.device:
    """The model and device options every program takes; returns the device."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device} was requested but no CUDA GPU is available "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise OptionError(f"--device {args.device!r} is not a device: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu or cuda, got {args.device!r}")
    check_positive(args, "tokens", "prompt_length", "batch", "layers", "hidden", "heads", "max_length", "tp")
    if args.hidden % args.heads:
        raise OptionError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.prompt_length + args.tokens > args.max_length:
        raise OptionError(f"the prompt ({args.prompt_length} tokens) plus --tokens ({args.tokens}) needs "
                          f"{args.prompt_length + args.tokens} cache positions but --max-length is {args.max_length}")
    return device


def report_option_error(error: OptionError) -> int:
    """Prints ``error`` as one line; returns the exit code of a bad option."""
    print(f"error: {error}", file=sys.stderr)
    return 2


class Progress:
    """A one-line progress bar on stderr (silent when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self.start = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{rate:6.1f} steps/s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (timings would otherwise measure only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_with_cache(model: HybridLM, prompts: list[torch.Tensor], tokens: int, decode_step, progress: Progress):
    """Greedy generation. Returns the per-row sequences and every step's logits [B, tokens, V]."""
    batch = len(prompts)
    model.reset_cache()
    if len({p.numel() for p in prompts}) == 1:
        last = model(torch.stack(prompts))[:, -1]
    else:  # ragged: prefill row by row, each into its own cache rows
        last = torch.cat([model(p[None], row_start=b)[:, -1] for b, p in enumerate(prompts)])
    step_logits = [last]
    generated = [last.argmax(-1)]
    progress.step()
    for _ in range(tokens - 1):
        logits = decode_step(generated[-1].view(batch, 1))[:, -1]
        step_logits.append(logits)
        generated.append(logits.argmax(-1))
        progress.step()
    new_tokens = torch.stack(generated, 1)
    sequences = [torch.cat([p, new_tokens[b]]) for b, p in enumerate(prompts)]
    return sequences, torch.stack(step_logits, 1)


def generate_without_cache(model: HybridLM, prompts: list[torch.Tensor], tokens: int, progress: Progress):
    """The same greedy generation, recomputing every row's whole sequence for each new token."""
    sequences = [p.clone() for p in prompts]
    for _ in range(tokens):
        for b, seq in enumerate(sequences):
            next_token = model.forward_uncached(seq[None])[0, -1].argmax(-1)
            sequences[b] = torch.cat([seq, next_token.view(1)])
        progress.step()
    return sequences
