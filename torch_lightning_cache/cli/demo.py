"""``python -m torch_lightning_cache demo``: greedy generation with the cache, checked against no cache.

A small MiniMax-style hybrid decoder (seeded random weights) prefills a
prompt and then decodes token by token, using the sequence cache in its
attention layers and the recurrent state in its lightning layers. The demo
then recomputes every step's logits from scratch (no cache, no custom op) and
fails if they differ by more than a stated tolerance. It also times generation
without the cache (recomputing the whole sequence for each new token).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from ..models.hybrid import HybridConfig, HybridLM
from . import serve
from .common import (DTYPES, TOLERANCE, OptionError, Progress, check_model_options, generate_with_cache,
                     generate_without_cache, report_option_error, sync)
from .tensor_parallel import DemoTensorParallel

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model and cache dtype")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate per row (default: 64)")
    parser.add_argument("--prompt-length", type=int, default=48, help="prompt tokens per row (default: 48)")
    parser.add_argument("--batch", type=int, default=4, help="rows generated together (default: 4)")
    parser.add_argument("--ragged", action="store_true",
                        help="give row b a prompt shorter by b * prompt_length / (2 * batch) tokens; rows are "
                             "prefilled one by one and decoded together, each at its own position")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (fullgraph)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, alternating lightning/attention")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    parser.add_argument("--heads", type=int, default=4, help="heads per layer (default: 4)")
    parser.add_argument("--max-length", type=int, default=256, help="cache capacity in tokens (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve.add_arguments(parser)  # --serve and its options (torch_lightning_cache/cli/serve.py)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks over heads; run under torchrun "
                        "--nproc-per-node N (gloo on the CPU, NCCL on GPUs) and compare with one process")
    parser.add_argument("--kv-quantization", choices=["int8", "fp8_e4m3"], default=None,
                        help="also run the attention layers on quantized K/V storage and compare with the "
                             "unquantized run (logits difference, greedy-token agreement, cache memory)")


def _kv_quantization_report(args, config: HybridConfig, prompts, sequences, reference_logits, dtype,
                            device) -> bool:
    """Teacher-forces the unquantized run's tokens through the same model with quantized K/V storage and
    prints the logits difference, greedy-token agreement and attention-layer cache memory. Returns
    whether every logit is finite."""
    quantized_config = dataclasses.replace(config, kv_quantization=args.kv_quantization)
    model = HybridLM(quantized_config, batch_size=args.batch, dtype=dtype, device=device, seed=args.seed).eval()
    lengths = [p.numel() for p in prompts]
    forced = torch.stack([seq[n:] for seq, n in zip(sequences, lengths)])  # [B, tokens], the unquantized greedy run
    with torch.inference_mode():
        model.reset_cache()
        if len(set(lengths)) == 1:
            logits = [model(torch.stack(prompts))[:, -1]]
        else:
            logits = [torch.cat([model(p[None], row_start=b)[:, -1] for b, p in enumerate(prompts)])]
        for t in range(args.tokens - 1):
            logits.append(model(forced[:, t:t + 1])[:, -1])
    logits = torch.stack(logits, 1)
    difference = (logits - reference_logits).abs().max().item()
    agreement = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    attention_bytes = model.cache_bytes().get("attention", 0)
    print(f"kv-quantization {args.kv_quantization}: cache memory per attention layer "
          f"{attention_bytes / 1024:.1f} KiB (codes + scales + positions); max |logits - unquantized| = "
          f"{difference:.3e}; greedy tokens agreeing with the unquantized run (same inputs): {100 * agreement:.1f}%")
    return bool(torch.isfinite(logits).all())


def run(args: argparse.Namespace) -> int:
    if getattr(args, "serve", False):
        return serve.run(args)
    try:
        device = check_model_options(args)
    except OptionError as error:
        return report_option_error(error)
    dtype = DTYPES[args.dtype]
    config = HybridConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          head_dim=args.hidden // args.heads, intermediate_size=2 * args.hidden,
                          max_length=args.max_length)
    tensor_parallel = None
    if args.tp != 1:
        try:
            tensor_parallel = DemoTensorParallel(args, device)
        except OptionError as error:
            return report_option_error(error)
        device = tensor_parallel.device  # this rank's GPU
    model = HybridLM(config, batch_size=args.batch, dtype=dtype, device=device, seed=args.seed).eval()
    if tensor_parallel is not None:
        model = tensor_parallel.parallelize(model)
    generator = torch.Generator().manual_seed(args.seed)
    lengths = [args.prompt_length - (b * args.prompt_length // (2 * args.batch) if args.ragged else 0)
               for b in range(args.batch)]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).to(device) for n in lengths]
    kinds = config.layer_kinds
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype: {args.dtype}, torch {torch.__version__}")
    print(f"model: {args.layers} layers ({kinds.count('lightning')} lightning, {kinds.count('attention')} attention), "
          f"hidden {args.hidden}, {args.heads} heads, cache capacity {args.max_length}; "
          f"batch {args.batch}, prompt lengths {lengths}, {args.tokens} new tokens per row")
    for kind, size in model.cache_bytes().items():
        what = "K|V buffer + positions" if kind == "attention" else "recurrent state"
        print(f"cache memory per {kind} layer: {size / 1024:.1f} KiB ({what})")

    decode_step = model
    if args.compile:
        model.set_check_bounds(device.type != "cuda")  # the host check syncs; captured code relies on the kernel
        decode_step = torch.compile(model, fullgraph=True)
    show = not args.no_progress and sys.stderr.isatty()  # a bar is noise in logs
    with torch.inference_mode():
        if args.compile:  # compile outside the timed region (and on a throwaway run)
            generate_with_cache(model, prompts, min(args.tokens, 3), decode_step, Progress(3, "compiling", False))
        sync(device)
        start = time.perf_counter()
        sequences, cached_logits = generate_with_cache(model, prompts, args.tokens, decode_step,
                                                       Progress(args.tokens, "with cache   ", show))
        sync(device)
        cached_seconds = time.perf_counter() - start

        start = time.perf_counter()
        uncached_sequences = generate_without_cache(model, prompts, args.tokens,
                                                    Progress(args.tokens, "without cache", show))
        sync(device)
        uncached_seconds = time.perf_counter() - start

        # Self-check: each step's logits, recomputed from the final sequence without any cache.
        worst = 0.0
        for b, seq in enumerate(sequences):
            full = model.forward_uncached(seq[None])[0]
            expected = full[lengths[b] - 1: lengths[b] - 1 + args.tokens]
            worst = max(worst, (cached_logits[b] - expected).abs().max().item())
    same_tokens = all(torch.equal(a, b) for a, b in zip(sequences, uncached_sequences))
    total = args.batch * args.tokens
    print(f"generated tokens (row 0): {sequences[0][lengths[0]:].tolist()[:16]}"
          f"{' ...' if args.tokens > 16 else ''}")
    print(f"with cache:    {total / cached_seconds:9.1f} tokens/s ({cached_seconds:.3f} s"
          f"{', compiled decode step' if args.compile else ''})")
    print(f"without cache: {total / uncached_seconds:9.1f} tokens/s ({uncached_seconds:.3f} s, full recomputation "
          f"per token) -> cache speed-up {uncached_seconds / cached_seconds:.1f}x")
    tolerance = TOLERANCE[dtype]
    verdict = "PASS" if worst <= tolerance else "FAIL"
    quantization = getattr(args, "kv_quantization", None)
    if quantization is not None and not _kv_quantization_report(args, config, prompts, sequences, cached_logits,
                                                                dtype, device):
        verdict = "FAIL"  # non-finite logits from the quantized cache
    print(f"self-check: max |logits with cache - recomputed without cache| = {worst:.3e} "
          f"(tolerance {tolerance:g}) {verdict}; greedy tokens identical without cache: {same_tokens}")
    passed = verdict == "PASS"
    if tensor_parallel is not None:
        passed = tensor_parallel.check(prompts, sequences, cached_logits) and passed
    return 0 if passed else 1
