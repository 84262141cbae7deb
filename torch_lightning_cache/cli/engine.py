"""The packed continuous-batching engine of ``demo --serve --engine packed``.

One model forward per engine step over every running request: the step's
decode tokens and prefill chunks are concatenated into ``[1, T]`` tokens with
``cu_seqlens`` (``HybridLM.forward_packed``), attention layers keep K|V in a
page pool addressed by block tables, lightning layers keep one state row per
running request.

Policies (vLLM's, where the spec is silent):

- **Scheduler** (:class:`TokenBudgetScheduler`): a token budget per step. Running
  decodes go first (one token each, oldest request first), then prefill chunks
  in arrival order with what is left of the budget; a prompt longer than the
  budget is prefilled in chunks over several steps, while the others decode.
- **Admission**: first come, first served. A request is admitted when a state row
  is free and the free pages, minus those promised to running requests, cover its
  whole length (prompt + its new tokens). Pages are then allocated as tokens are
  written, so a running request never waits for a page and nothing is preempted.
- **Prefix cache**: the first request with the system prompt writes it; when its
  cache reaches the last FULL page of the system prompt, those pages (one more
  reference, held by the prefix cache) and the lightning states at that position
  become the cached prefix. A later request with the system prompt points its
  block table at those pages (no copy), starts its state row from the saved
  states, and prefills the rest. Only full pages are shared
  (:mod:`torch_lightning_cache.paging`): the system prompt's partial last page is
  recomputed by each request, so no shared page is ever written (no copy-on-write).
- **Speculative decoding** (``draft=``): a draft model with its own pages (same page ids) and state rows
  mirrors every prefill chunk; for each decoding request it proposes up to ``draft_tokens`` tokens (one packed
  draft forward per proposal, all decoding requests together, never past the request's last token), then the
  target verifies every request's pending token and proposals as one sequence of the step's single packed
  forward, alongside the prefill chunks, keeping the state after each token (``checkpoints``, one per token).
  The longest agreeing prefix is kept, plus the target's own next token; both models roll their lightning
  states back to it and their positions to it (K|V written past it are overwritten later, never read).
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from ..cache import ATTENTION
from ..models.hybrid import HybridLM, PackedBatch
from ..paging import PageAllocator, pages_for


class TokenBudgetScheduler:
    """Plans one step: decodes first, then chunked prefills, at most ``budget`` tokens in all."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        self.budget = budget

    def plan(self, running: list) -> list[tuple[object, int]]:
        """``running`` in arrival order; each item has ``prefill_left`` (prompt tokens not yet in the cache, 0 when
        decoding) and ``chunk_limit`` (most prompt tokens it may take this step). Returns ``(item, tokens)`` pairs,
        decodes first."""
        left = self.budget
        steps = []
        for item in running:
            if item.prefill_left == 0 and left:
                steps.append((item, 1))
                left -= 1
        for item in running:
            if item.prefill_left and left:
                n = min(item.prefill_left, item.chunk_limit, left)
                if n > 0:
                    steps.append((item, n))
                    left -= n
        return steps


@dataclasses.dataclass(eq=False)
class Running:
    """A request in the engine: its tokens, state row, pages and how much of it the cache holds."""

    request: object
    context: list[int]  # system prompt (if any) + prompt
    slot: int
    pages: list[int]
    cached: int  # tokens in the cache
    writes_prefix: bool = False  # the request whose cache becomes the cached prefix
    prefix_end: int = 0

    @property
    def prefill_left(self) -> int:
        return max(len(self.context) - self.cached, 0)

    @property
    def chunk_limit(self) -> int:
        if self.writes_prefix and self.cached < self.prefix_end:  # end a chunk where the prefix ends
            return self.prefix_end - self.cached
        return self.prefill_left

    def total(self) -> int:
        return len(self.context) + self.request.max_new

    def next_tokens(self, n: int) -> list[int]:
        if self.prefill_left:
            return self.context[self.cached: self.cached + n]
        return [self.request.generated[-1]]


class PackedEngine:
    """Serves requests with one packed forward per step over a paged K|V pool."""

    def __init__(self, model: HybridLM, system: torch.Tensor, num_pages: int, page_size: int, token_budget: int,
                 draft: HybridLM | None = None, draft_tokens: int = 4, draft_noise: float = 0.0, seed: int = 0):
        self.model = model
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.draft_noise = draft_noise
        self.noise = torch.Generator(device=system.device).manual_seed(seed + 2)
        self.accepted = self.drafted = 0
        if draft is not None and draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.device = system.device
        self.system = system.tolist()
        self.page_size = page_size
        self.pages = PageAllocator(num_pages)
        model.init_pages(num_pages, page_size)
        if draft is not None:  # its own pools, addressed by the same page ids
            draft.init_pages(num_pages, page_size)
            if not all(layer.mixer.paged_ops for layer in list(model.layers) + list(draft.layers)):
                raise ValueError("speculative decoding in the packed engine needs the packed ops (cu_seqlens=)")
        self.scheduler = TokenBudgetScheduler(token_budget)
        self.free_slots = list(range(model.batch_size))
        self.lightning = [layer.mixer for layer in model.layers if layer.kind != ATTENTION]
        self.draft_lightning = [] if draft is None else [layer.mixer for layer in draft.layers
                                                         if layer.kind != ATTENTION]
        self.prefix_end = (len(self.system) // page_size) * page_size  # the system prompt's full pages
        self.prefix_pages: list[int] | None = None
        self.prefix_states: list[torch.Tensor] | None = None  # target's lightning layers, then the draft's
        self.prefix_writer: Running | None = None
        self.hits = self.lookups = 0
        self.steps = self.calls = 0
        self.peak_running = 0
        self.peak_contiguous_tokens = 0  # what contiguous [max_length] rows would reserve for the running requests

    def _promised(self, running: list[Running]) -> int:
        return sum(pages_for(r.total(), self.page_size) - len(r.pages) for r in running)

    def _admit(self, request, running: list[Running]) -> Running | None:
        context = (self.system if request.with_system else []) + request.prompt.tolist()
        hit = request.with_system and self.prefix_pages is not None
        shared = len(self.prefix_pages) if hit else 0
        need = pages_for(len(context) + request.max_new, self.page_size) - shared
        if not self.free_slots or need > self.pages.num_free - self._promised(running):
            return None
        slot = self.free_slots.pop(0)
        run = Running(request, context, slot, [], 0)
        if request.with_system:
            self.lookups += 1
        if hit:
            self.hits += 1
            run.pages = self.pages.share(self.prefix_pages)
            run.cached = self.prefix_end
            for mixer, state in zip(self.lightning + self.draft_lightning, self.prefix_states):
                mixer.state[slot] = state
        else:
            for mixer in self.lightning + self.draft_lightning:
                mixer.state[slot] = 0
            if request.with_system and self.prefix_writer is None and self.prefix_end > 0:
                run.writes_prefix, run.prefix_end = True, self.prefix_end
                self.prefix_writer = run
        return run

    def _save_prefix(self, run: Running) -> None:
        count = self.prefix_end // self.page_size
        self.prefix_pages = self.pages.share(run.pages[:count])  # the prefix cache's own reference
        self.prefix_states = [mixer.state[run.slot].clone() for mixer in self.lightning + self.draft_lightning]
        run.writes_prefix = False

    def _finish(self, run: Running) -> None:
        self.pages.free(run.pages)
        self.free_slots.append(run.slot)  # its state row is overwritten on the next admission

    def serve(self, requests: list) -> None:
        """Serves ``requests`` (greedy), filling each one's ``generated``."""
        waiting = collections.deque(sorted(requests, key=lambda r: (r.arrival, r.rid)))
        running: list[Running] = []
        while waiting or running:
            while waiting and waiting[0].arrival <= self.steps:
                run = self._admit(waiting[0], running)
                if run is None:
                    break
                waiting.popleft()
                run.request.generated = []
                running.append(run)
            if running:
                self._step(running)
            for run in [r for r in running if len(r.request.generated) >= r.request.max_new]:
                running.remove(run)
                self._finish(run)
            self.steps += 1

    def _step(self, running: list[Running]) -> None:
        self.peak_running = max(self.peak_running, len(running))
        self.peak_contiguous_tokens = max(self.peak_contiguous_tokens,
                                          (len(running) + (self.prefix_pages is not None)) * self.model.config.max_length)
        plan = self.scheduler.plan(running)
        # Speculation: a decoding request proposes up to draft_tokens tokens, never past its last one.
        proposals: dict[int, list[int]] = {}
        if self.draft is not None:
            proposals = self._propose(plan)
        sequences = [(run, run.cached, run.next_tokens(n) if id(run) not in proposals
                      else run.next_tokens(1) + proposals[id(run)]) for run, n in plan]
        lengths = [len(tokens) for _, _, tokens in sequences]
        checkpoint_tokens = 1 + max((len(p) for p in proposals.values()), default=-1) if proposals else 0
        ids, batch = self._pack(sequences, checkpoint_tokens)
        if not proposals:
            choices = self.model.forward_packed(ids, batch).argmax(-1).tolist()
            if self.draft is not None:  # the draft takes in the same prefill chunks
                self.draft.forward_packed(ids, batch)
            self.calls += 1
            for (run, n), token in zip(plan, choices):
                self._advance(run, n, [token])
            return
        greedy = self.model.forward_packed(ids, batch, all_logits=True).argmax(-1).tolist()
        self.calls += 1
        ends = batch.cu_seqlens[1:].tolist()
        for s, ((run, n), length) in enumerate(zip(plan, lengths)):
            proposed = proposals.get(id(run))
            if proposed is None:
                self._advance(run, n, [greedy[ends[s] - 1]])
                continue
            row = greedy[ends[s] - length: ends[s]]  # the target's choice after the pending token and each proposal
            ok = 0
            while ok < len(proposed) and proposed[ok] == row[ok]:
                ok += 1
            self.accepted += ok
            self.drafted += len(proposed)
            if ok < len(proposed):
                self._roll_back(run, s, ok)
            self._advance(run, ok + 1, row[:ok + 1])

    def _roll_back(self, run: Running, sequence: int, ok: int) -> None:
        """Both models' lightning states back to after the request's pending token and ``ok`` accepted
        proposals (the target's from this step's per-token checkpoints, the draft's from its snapshots)."""
        for mixer in self.lightning:
            mixer.state[run.slot] = mixer.checkpoints[sequence, ok]
        for mixer, snapshots in zip(self.draft_lightning, self._draft_snapshots[id(run)]):
            mixer.state[run.slot] = snapshots[ok]

    def _pack(self, sequences: list[tuple[Running, int, list[int]]],
              checkpoint_tokens: int = 0) -> tuple[torch.Tensor, PackedBatch]:
        """One packed forward's input: each ``(run, position, tokens)`` writes ``tokens`` at ``position ..`` of
        its request, whose pages grow to hold them (the pages written must each have a single holder)."""
        ids, lengths, starts, slots, tables = [], [], [], [], []
        for run, position, tokens in sequences:
            end = position + len(tokens)
            grow = pages_for(end, self.page_size) - len(run.pages)  # < 0 after a speculative rollback
            run.pages += self.pages.alloc(max(grow, 0))
            for page in run.pages[position // self.page_size: pages_for(end, self.page_size)]:
                self.pages.check_writable(page)
            ids += tokens
            lengths.append(len(tokens))
            starts.append(position)
            slots.append(run.slot)
            tables.append(run.pages)
        batch = PackedBatch.build(lengths, starts, slots, tables, self.page_size, self.device,
                                  checkpoint_tokens=checkpoint_tokens)
        return torch.tensor(ids, dtype=torch.int64, device=self.device)[None], batch

    def _advance(self, run: Running, n: int, new_tokens: list[int]) -> None:
        """``n`` more of the request's tokens are in the cache; ``new_tokens`` follow them when decoding."""
        run.cached += n
        if run.writes_prefix and run.cached == run.prefix_end:
            self._save_prefix(run)
        if run.prefill_left == 0:  # the prompt is in: these logit rows predict the next tokens
            run.request.generated.extend(new_tokens[:run.request.max_new - len(run.request.generated)])

    def _propose(self, plan: list[tuple[Running, int]]) -> dict[int, list[int]]:
        """The draft's proposals for the plan's decoding requests (keyed by id(run)), and its prefill chunks: it
        takes in every pending token and proposal, keeping its state after each (``_draft_snapshots``)."""
        decoding = [run for run, n in plan if run.prefill_left == 0]
        room = {id(run): min(self.draft_tokens, run.request.max_new - len(run.request.generated) - 1)
                for run in decoding}
        proposals: dict[int, list[int]] = {id(run): [] for run in decoding if room[id(run)] > 0}
        self._draft_snapshots = {key: [[] for _ in self.draft_lightning] for key in proposals}
        if not proposals:
            return {}
        depth = max(room[key] for key in proposals)
        for t in range(depth + 1):  # call t takes in token t (the pending token, then proposal t)
            if t == 0:  # with the step's prefill chunks, which the target runs in its one forward
                members = list(plan)
            else:
                members = [(run, 1) for run in decoding if id(run) in proposals and room[id(run)] >= t]
            sequences = []
            for run, n in members:
                if id(run) not in proposals:  # a prefill chunk (or a last decode): what the target takes in
                    sequences.append((run, run.cached, run.next_tokens(n)))
                else:
                    token = run.next_tokens(1) if t == 0 else [proposals[id(run)][t - 1]]  # pending, then proposals
                    sequences.append((run, run.cached + t, token))
            logits = self.draft.forward_packed(*self._pack(sequences))
            if self.draft_noise > 0:  # the draft's deliberate mistakes
                logits = logits + self.draft_noise * logits.std(-1, keepdim=True) * torch.randn(
                    logits.shape, generator=self.noise, device=logits.device)
            choices = logits.argmax(-1).tolist()
            for (run, _), token in zip(members, choices):
                key = id(run)
                if key not in proposals:
                    continue
                for mixer, snapshots in zip(self.draft_lightning, self._draft_snapshots[key]):
                    snapshots.append(mixer.state[run.slot].clone())  # after t + 1 of its tokens
                if t < room[key]:
                    proposals[key].append(token)
        return proposals

    def pages_in_use(self) -> tuple[int, int]:
        """(peak pages in use, pages in the pool)."""
        return self.pages.peak_used, self.pages.num_pages
