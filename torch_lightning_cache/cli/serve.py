"""``python -m torch_lightning_cache demo --serve``: continuous batching over a cache pool.

Two engines serve the same requests (``--engine``): ``packed`` (the default,
``cli/engine.py``: one packed forward per step over paged K|V, see there) and
``padded``, described below (pool rows of full capacity, one call per admission and
one per decode step, and speculative decoding). ``both`` prints their throughput
side by side.

A small hybrid model (``models.hybrid.HybridLM``) serves more requests than its cache
has rows. Requests arrive over time, are admitted into free pool rows, decode
together (each row at its own position, ``slot_ids`` picking pool rows in every
layer) and leave at different lengths; their rows are then forgotten with
``LightningCache.reset_slots`` and reused.

Prefix caching: most requests start with one shared system prompt. The first
of them is prefilled whole, system prompt included, in ONE call that also
stores the lightning layers' states after the system prompt
(``lightning_prefill(..., checkpoints=, checkpoint_every=len(system))``). That
row's attention K|V rows (positions before the end of the system prompt) and
those checkpoints become a reserved prefix row of the pool; every later
request with the system prompt starts from a copy of it
(``LightningCache.copy_slots``) and prefills only its own tokens.

Speculative decoding: a draft model (the same weights, with noise added to its
logits, so that it is deliberately wrong some of the time) proposes ``k``
tokens per round; the target checks them in one call of ``k + 1`` tokens whose
lightning layers decode token by token and keep each step's state
(``lightning_decode(step_states=)``). Each row then keeps its accepted tokens:
``lightning_accept`` picks the state after them and ``rewind_cache`` moves the
attention positions back over the rejected ones (in both models).

Self-check: every request's tokens must equal greedy decoding of that request
alone without any cache. Because greedy decoding is deterministic, that holds
exactly when every served token is the argmax of ``forward_uncached`` (no
cache, no custom op) over the request's own sequence up to it; one recomputation
per request checks all its tokens. A token whose uncached logit is within the
demo's tolerance of the best one counts as a near-tie (reported, not an error:
the cached and uncached paths round differently). Any other difference exits 1.

``--kv-quantization int8|fp8_e4m3``: both engines keep the attention layers' K|V as
codes with per-token scales (pages of codes in the packed engine). Quantization
changes the model's outputs, so the self-check's reference is then each request
decoded alone through the model's own quantized cache (one prefill of the
request's whole sequence, every token quantized as it is when served).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import torch

from ..cache import ATTENTION, LightningCache, LightningCacheMetaData
from ..models.hybrid import HybridConfig, HybridLM
from .engine import PackedEngine
from .common import DTYPES, TOLERANCE, OptionError, check_model_options, check_positive, report_option_error, sync


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``demo --serve`` (the model options are the demo's)."""
    group = parser.add_argument_group("serving (--serve)")
    group.add_argument("--serve", action="store_true",
                       help="continuous batching over a cache pool with prefix caching and speculative decoding")
    group.add_argument("--requests", type=int, default=12, help="requests to serve (default: 12)")
    group.add_argument("--pool-rows", type=int, default=4, help="cache rows for requests (default: 4)")
    group.add_argument("--system-length", type=int, default=40,
                       help="tokens of the shared system prompt (default: 40)")
    group.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per speculative round (default: 4)")
    group.add_argument("--draft-noise", type=float, default=0.2,
                       help="noise on the draft's logits, in units of their standard deviation (default: 0.2)")
    group.add_argument("--engine", choices=["packed", "padded", "both"], default="packed",
                       help="packed: one packed forward per step over paged K|V (cli/engine.py); padded: pool rows, "
                            "one call per admission and one per decode step, plus speculative decoding; both: "
                            "both on the same requests, throughput side by side (default: packed)")
    group.add_argument("--token-budget", type=int, default=64,
                       help="packed engine: tokens per step, decodes first then prefill chunks (default: 64)")
    group.add_argument("--page-size", type=int, default=16, help="packed engine: tokens per K|V page (default: 16)")
    group.add_argument("--max-running", type=int, default=16,
                       help="packed engine: requests running at once (lightning-state rows; default: 16). Its "
                            "page pool holds as many tokens as the padded engine's pool rows")


@dataclasses.dataclass
class Request:
    rid: int
    arrival: int  # scheduler step at which it arrives
    prompt: torch.Tensor  # its own tokens (after the system prompt, if it has one)
    with_system: bool
    max_new: int
    generated: list[int] = dataclasses.field(default_factory=list)


def make_requests(count: int, prompt_length: int, tokens: int, vocab: int, seed: int) -> list[Request]:
    """Requests of random lengths arriving over time; three in four share the system prompt."""
    g = torch.Generator().manual_seed(seed + 1)

    def between(low, high):
        return int(torch.randint(low, high + 1, (), generator=g))

    requests, arrival = [], 0
    for rid in range(count):
        prompt = torch.randint(0, vocab, (between(max(1, prompt_length // 4), prompt_length),), generator=g)
        requests.append(Request(rid, arrival, prompt, with_system=rid % 4 != 3,
                                max_new=between(max(1, tokens // 4), tokens)))
        arrival += between(0, 3)
    return requests


def pool_cache(model) -> LightningCache:
    """The model's cache buffers as a :class:`LightningCache` (the same tensors), for its slot operations."""
    c = model.config
    meta = LightningCacheMetaData.create(batch_size=model.batch_size, num_heads=c.num_heads, head_dim=c.head_dim,
                                         max_length=c.max_length, block_size=c.block_size,
                                         kv_quantization=c.kv_quantization)
    cache = LightningCache.init_cache(len(model.layers), meta, c.layer_kinds)
    for view, layer in zip(cache, model.layers):
        if layer.kind == ATTENTION:
            view.key_value, view.index = layer.mixer.key_value, layer.mixer.index
            if layer.mixer.quantized:
                view.scales = layer.mixer.scales
        else:
            view.key_value = layer.mixer.state
    return cache


class Engine:
    """A model whose caches are a pool: ``pool_rows`` request rows plus one prefix row (the last)."""

    def __init__(self, model, system: torch.Tensor):
        self.model = model
        self.pool = pool_cache(model)
        self.prefix_row = model.batch_size - 1
        self.system = system
        self.prefix_ready = False
        self.hits = self.lookups = 0
        self.lightning = [layer.mixer for layer in model.layers if layer.kind != ATTENTION]
        self.attention = [layer.mixer for layer in model.layers if layer.kind == ATTENTION]
        self.device = system.device

    def _ids(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def admit(self, slot: int, request: Request) -> torch.Tensor:
        """Prefills ``request`` into pool row ``slot`` (a fresh row); returns its last logits ``[vocab]``."""
        prompt = request.prompt.to(self.device)
        slot_ids = self._ids([slot])
        if not request.with_system:
            return self.model(prompt[None], slot_ids=slot_ids)[0, -1]
        self.lookups += 1
        if self.prefix_ready:  # hit: the system prompt's K|V and states, copied from the prefix row
            self.hits += 1
            self.pool.copy_slots(self._ids([self.prefix_row]), slot_ids)
            return self.model(prompt[None], slot_ids=slot_ids)[0, -1]
        # Miss: one prefill of system + prompt that also checkpoints the states after the system prompt.
        every = self.system.numel()
        checkpoints = [torch.zeros(1, 1, *m.state.shape[1:], dtype=m.state.dtype, device=self.device)
                       for m in self.lightning]
        logits = self.model(torch.cat([self.system, prompt])[None], slot_ids=slot_ids, checkpoints=checkpoints,
                            checkpoint_every=every)[0, -1]
        # The prefix row: this row's K|V (positions >= `every` are never read: the position says so) ...
        self.pool.copy_slots(slot_ids, self._ids([self.prefix_row]))
        for m in self.attention:
            m.index[self.prefix_row] = every
        for m, cp in zip(self.lightning, checkpoints):  # ... and the states after the system prompt
            m.state[self.prefix_row] = cp[0, 0]
        self.prefix_ready = True
        return logits

    def release(self, slots: list[int]) -> None:
        self.pool.reset_slots(self._ids(slots))

    def step_buffers(self, batch: int, tokens: int) -> list[torch.Tensor]:
        """One ``[batch, tokens + 1, H, D, D]`` step-state buffer per lightning layer."""
        return [torch.empty(batch, tokens + 1, *m.state.shape[1:], dtype=m.state.dtype, device=self.device)
                for m in self.lightning]

    def keep(self, slot_ids: torch.Tensor, fed: int, kept: torch.Tensor, steps: list[torch.Tensor]) -> None:
        """After feeding ``fed`` tokens per row, keep the first ``kept[b]``: states from ``steps``, positions back."""
        for m, step in zip(self.lightning, steps):
            torch.ops.lightning_cache.lightning_accept(m.state, step, kept, slot_ids, True)
        for m in self.attention:
            torch.ops.lightning_cache.rewind_cache(m.index, fed - kept, slot_ids, False, True)


class Scheduler:
    """Admits arrived requests into free rows, steps the active ones, frees finished rows."""

    def __init__(self, requests: list[Request], pool_rows: int):
        self.waiting = collections.deque(sorted(requests, key=lambda r: (r.arrival, r.rid)))
        self.free = list(range(pool_rows))
        self.active: dict[int, Request] = {}
        self.step = 0
        self.reused = 0
        self.used = set()

    def admissions(self):
        while self.free and self.waiting and self.waiting[0].arrival <= self.step:
            slot = self.free.pop(0)
            self.reused += slot in self.used
            self.used.add(slot)
            request = self.waiting.popleft()
            self.active[slot] = request
            yield slot, request

    def finished(self) -> list[int]:
        done = [slot for slot, r in self.active.items() if len(r.generated) >= r.max_new]
        for slot in done:
            del self.active[slot]
            self.free.append(slot)
        return done

    def busy(self) -> bool:
        return bool(self.waiting or self.active)


def _argmax(logits: torch.Tensor) -> int:
    return int(logits.argmax(-1))


def serve_plain(engine: Engine, requests: list[Request], pool_rows: int) -> int:
    """Greedy continuous batching. Returns the number of model calls."""
    sched, calls = Scheduler(requests, pool_rows), 0
    while sched.busy():
        for slot, request in sched.admissions():
            request.generated = [_argmax(engine.admit(slot, request))]
            calls += 1
        done = sched.finished()
        if done:
            engine.release(done)
        if sched.active:
            slots = list(sched.active)
            last = torch.tensor([[sched.active[s].generated[-1]] for s in slots], device=engine.device)
            logits = engine.model(last, slot_ids=engine._ids(slots))[:, -1]
            calls += 1
            for s, token in zip(slots, logits.argmax(-1).tolist()):
                sched.active[s].generated.append(token)
            done = sched.finished()
            if done:
                engine.release(done)
        sched.step += 1
    return calls


def serve_speculative(target: Engine, draft: Engine, requests: list[Request], pool_rows: int, k: int,
                      noise: float, seed: int) -> tuple[int, int, int]:
    """Greedy continuous batching with a noisy draft. Returns (target calls, accepted, drafted)."""
    sched, calls, accepted, drafted = Scheduler(requests, pool_rows), 0, 0, 0
    g = torch.Generator(device=target.device).manual_seed(seed + 2)

    def noisy(logits):  # the draft's deliberate mistakes
        return logits + noise * logits.std(-1, keepdim=True) * torch.randn(logits.shape, generator=g,
                                                                         device=logits.device)

    while sched.busy():
        for slot, request in sched.admissions():
            request.generated = [_argmax(target.admit(slot, request))]
            draft.admit(slot, request)
            calls += 1
        done = sched.finished()
        if done:
            target.release(done)
            draft.release(done)
        if sched.active:
            slots = list(sched.active)
            ids = target._ids(slots)
            batch = len(slots)
            pending = torch.tensor([sched.active[s].generated[-1] for s in slots], device=target.device)
            # Draft: k proposals, one token per call, plus one call to take in the last proposal, so that its
            # cache can keep any number of them. Its step states, stacked: index t = after t tokens.
            fed, draft_steps = [pending], [[] for _ in draft.lightning]
            for t in range(k + 1):
                steps = draft.step_buffers(batch, 1)
                logits = draft.model(fed[-1].view(batch, 1), slot_ids=ids, step_states=steps)[:, -1]
                for layer_steps, step in zip(draft_steps, steps):
                    layer_steps.extend([step[:, 0], step[:, 1]] if t == 0 else [step[:, 1]])
                if t < k:
                    fed.append(noisy(logits).argmax(-1))
            proposal = torch.stack(fed, 1)  # [batch, k + 1]: pending token, then the k draft tokens
            # Target: all k + 1 tokens in one call, lightning layers keeping each step's state.
            steps = target.step_buffers(batch, k + 1)
            greedy = target.model(proposal, slot_ids=ids, step_states=steps).argmax(-1)  # [batch, k + 1]
            calls += 1
            agree = (proposal[:, 1:] == greedy[:, :-1]).long().cumprod(1)
            num_ok = agree.sum(1)  # accepted draft tokens per row
            target.keep(ids, k + 1, num_ok + 1, steps)
            draft.keep(ids, k + 1, num_ok + 1, [torch.stack(s, 1) for s in draft_steps])
            accepted += int(num_ok.sum())
            drafted += k * batch
            for s, row, ok in zip(slots, greedy.tolist(), num_ok.tolist()):
                request = sched.active[s]
                request.generated.extend(row[: ok + 1][: request.max_new - len(request.generated)])
            done = sched.finished()
            if done:
                target.release(done)
                draft.release(done)
        sched.step += 1
    return calls, accepted, drafted


def _logits_alone(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, vocab]`` of ``tokens [n]`` decoded alone: without any cache, or with quantized K|V through
    batch row 0 of the model's own cache (reset first), since quantization is part of what is served."""
    if model.config.kv_quantization is None:
        return model.forward_uncached(tokens[None])[0]
    model.reset_cache()
    return model(tokens[None])[0]


def _alone(model) -> str:
    quantization = model.config.kv_quantization
    return "alone without any cache" if quantization is None else f"alone on its own {quantization} cache"


def check_requests(model, system: torch.Tensor, requests: list[Request], tolerance: float) -> tuple[int, int]:
    """(mismatches, near-ties) of the served tokens against each request decoded alone (``_logits_alone``)."""
    mismatches = ties = 0
    for r in requests:
        context = torch.cat([system, r.prompt.to(system.device)]) if r.with_system else r.prompt.to(system.device)
        served = torch.tensor(r.generated, device=system.device)
        logits = _logits_alone(model, torch.cat([context, served]))
        logits = logits[context.numel() - 1: context.numel() - 1 + served.numel()]  # predicting each served token
        best = logits.max(-1).values
        chosen = logits.gather(-1, served[:, None])[:, 0]
        differs = logits.argmax(-1) != served
        near = differs & (best - chosen <= tolerance)
        ties += int(near.sum())
        mismatches += int((differs & ~near).sum()) + (len(r.generated) != r.max_new)
    return mismatches, ties


def _copy(requests: list[Request]) -> list[Request]:
    return [dataclasses.replace(r, generated=[]) for r in requests]


def serve_packed(model, system: torch.Tensor, requests: list[Request], args: argparse.Namespace,
                 dtype: torch.dtype, draft=None) -> tuple[float, bool]:
    """The packed engine on ``requests`` (filled in), speculative with a ``draft``; prints its lines. Returns
    (tokens/s, passed)."""
    num_pages = (args.pool_rows + 1) * args.max_length // args.page_size  # the padded pool's K|V memory
    engine = PackedEngine(model, system, num_pages, args.page_size, args.token_budget, draft=draft,
                          draft_tokens=args.draft_tokens, draft_noise=args.draft_noise, seed=args.seed)
    sync(system.device)
    start = time.perf_counter()
    engine.serve(requests)
    sync(system.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.generated) for r in requests)
    mismatches, ties = check_requests(model, system, requests, TOLERANCE[dtype])
    peak, pool = engine.pages_in_use()
    name = "packed:" if draft is None else "packed-spec:"
    line = (f"{name:<12} {len(requests) / seconds:7.1f} requests/s, {tokens / seconds:8.1f} tokens/s "
            f"({tokens} tokens in {seconds:.3f} s, {engine.calls} target forward calls, token budget "
            f"{args.token_budget}); prefix cache: {engine.hits} hits / {engine.lookups} lookups")
    if draft is not None:
        line += (f"; acceptance {engine.accepted / max(engine.drafted, 1):.1%} ({engine.accepted}/{engine.drafted} "
                 f"draft tokens, up to {args.draft_tokens} per round, draft noise {args.draft_noise:g})")
    print(line)
    print(f"{'':<12} pages: peak {peak} of {pool} in use ({peak * args.page_size} tokens of {args.page_size}) for "
          f"up to {engine.peak_running} running requests; contiguous rows would reserve "
          f"{engine.peak_contiguous_tokens} tokens for them")
    print(f"{'':<12} self-check against each request {_alone(model)}: "
          f"{'PASS' if mismatches == 0 else 'FAIL'} ({mismatches} differing tokens, {ties} near-ties)")
    return tokens / seconds, mismatches == 0


def run(args: argparse.Namespace) -> int:
    try:
        device = check_model_options(args)
        check_positive(args, "requests", "pool_rows", "system_length", "draft_tokens", "token_budget", "page_size",
                       "max_running")
        if not args.draft_noise >= 0:
            raise OptionError(f"--draft-noise must be non-negative, got {args.draft_noise}")
        need = args.system_length + args.prompt_length + args.tokens + args.draft_tokens + 1
        if need > args.max_length:
            raise OptionError(f"a request may need {need} cache positions (system prompt + --prompt-length + "
                                 f"--tokens + --draft-tokens + 1) but --max-length is {args.max_length}")
        if args.engine != "padded" and (args.pool_rows + 1) * args.max_length // args.page_size < -(-need // args.page_size):
            raise OptionError(f"the packed engine's page pool ((--pool-rows + 1) * --max-length tokens) cannot hold "
                              f"one request of {need} tokens in pages of {args.page_size}")
    except OptionError as error:
        return report_option_error(error)
    dtype = DTYPES[args.dtype]
    config = HybridConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          head_dim=args.hidden // args.heads, intermediate_size=2 * args.hidden,
                          max_length=args.max_length, kv_quantization=getattr(args, "kv_quantization", None))
    rows = args.pool_rows + 1  # the last row holds the cached prefix

    def engine():
        model = HybridLM(config, batch_size=rows, dtype=dtype, device=device, seed=args.seed).eval()
        return Engine(model, system)

    g = torch.Generator().manual_seed(args.seed)
    system = torch.randint(0, config.vocab_size, (args.system_length,), generator=g).to(device)
    requests = make_requests(args.requests, args.prompt_length, args.tokens, config.vocab_size, args.seed)
    kinds = config.layer_kinds
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype: {args.dtype}, torch {torch.__version__}")
    print(f"serve: {args.requests} requests (arriving over {requests[-1].arrival + 1} steps, prompts "
          f"{min(r.prompt.numel() for r in requests)}-{max(r.prompt.numel() for r in requests)} tokens, "
          f"{min(r.max_new for r in requests)}-{max(r.max_new for r in requests)} new tokens), "
          f"{sum(r.with_system for r in requests)} of them after a {args.system_length}-token system prompt; "
          f"pool of {args.pool_rows} rows + 1 prefix row; model: {args.layers} layers "
          f"({kinds.count('lightning')} lightning, {kinds.count('attention')} attention), hidden {args.hidden}")
    if config.kv_quantization is not None:
        head_bytes = 2 * config.head_dim  # K and V of one head and token
        print(f"K|V storage: {config.kv_quantization} codes + float32 scales, {head_bytes + 8} bytes per token and "
              f"head ({args.dtype} storage: {head_bytes * DTYPES[args.dtype].itemsize})")

    results, speed, failed = {}, {}, False
    with torch.inference_mode():
        if args.engine != "padded":
            model = HybridLM(config, batch_size=args.max_running, dtype=dtype, device=device, seed=args.seed).eval()
            served = _copy(requests)
            speed["packed"], passed = serve_packed(model, system, served, args, dtype)
            failed |= not passed
            results["packed"] = served
            # Speculative decoding on the packed engine: a draft with the target's weights (noisy logits).
            model = HybridLM(config, batch_size=args.max_running, dtype=dtype, device=device, seed=args.seed).eval()
            draft = HybridLM(config, batch_size=args.max_running, dtype=dtype, device=device, seed=args.seed).eval()
            served = _copy(requests)
            try:
                speed["packed-spec"], passed = serve_packed(model, system, served, args, dtype, draft=draft)
            except ValueError as error:  # the older ops: no per-token checkpoints in a packed call
                if "needs the packed ops" not in str(error):
                    raise
                print(f"{'packed-spec:':<12} skipped ({error})")
            else:
                failed |= not passed
                results["packed-spec"] = served
                same = all(a.generated == b.generated for a, b in zip(results["packed"], served))
                print(f"packed plain and speculative serving produced the same tokens: {same}")
                failed |= not same
        for mode in ("plain", "speculative") if args.engine != "packed" else ():
            target = engine()
            served = _copy(requests)
            sync(device)
            start = time.perf_counter()
            if mode == "plain":
                calls = serve_plain(target, served, args.pool_rows)
            else:
                calls, accepted, drafted = serve_speculative(target, engine(), served, args.pool_rows,
                                                             args.draft_tokens, args.draft_noise, args.seed)
            sync(device)
            seconds = time.perf_counter() - start
            tokens = sum(len(r.generated) for r in served)
            speed[mode] = tokens / seconds
            mismatches, ties = check_requests(target.model, system, served, TOLERANCE[dtype])
            failed |= mismatches > 0
            results[mode] = served
            line = (f"{mode + ':':<12} {len(served) / seconds:7.1f} requests/s, {tokens / seconds:8.1f} tokens/s "
                    f"({tokens} tokens in {seconds:.3f} s, {calls} target calls); prefix cache: {target.hits} hits "
                    f"/ {target.lookups} lookups")
            if mode == "speculative":
                line += (f"; acceptance {accepted / max(drafted, 1):.1%} ({accepted}/{drafted} draft tokens, "
                         f"{args.draft_tokens} per round, draft noise {args.draft_noise:g})")
            print(line)
            print(f"{'':<12} self-check against each request {_alone(target.model)}: "
                  f"{'PASS' if mismatches == 0 else 'FAIL'} ({mismatches} differing tokens, {ties} near-ties)")
    if "speculative" in results:
        same = all(a.generated == b.generated for a, b in zip(results["plain"], results["speculative"]))
        print(f"plain and speculative serving produced the same tokens: {same}")
    if args.engine == "both":
        same = all(a.generated == b.generated for a, b in zip(results["plain"], results["packed"]))
        print(f"packed vs padded engine (greedy, same requests): {speed['packed']:.1f} vs {speed['plain']:.1f} "
              f"tokens/s -> {speed['packed'] / speed['plain']:.2f}x; same tokens: {same}")
    first = next(iter(results.values()))
    print(f"request 0: {requests[0].prompt.numel()} prompt tokens -> {first[0].generated[:12]}"
          f"{' ...' if len(first[0].generated) > 12 else ''}")
    return 1 if failed else 0
