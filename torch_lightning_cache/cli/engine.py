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

    def __init__(self, model: HybridLM, system: torch.Tensor, num_pages: int, page_size: int, token_budget: int):
        self.model = model
        self.device = system.device
        self.system = system.tolist()
        self.page_size = page_size
        self.pages = PageAllocator(num_pages)
        model.init_pages(num_pages, page_size)
        self.scheduler = TokenBudgetScheduler(token_budget)
        self.free_slots = list(range(model.batch_size))
        self.lightning = [layer.mixer for layer in model.layers if layer.kind != ATTENTION]
        self.prefix_end = (len(self.system) // page_size) * page_size  # the system prompt's full pages
        self.prefix_pages: list[int] | None = None
        self.prefix_states: list[torch.Tensor] | None = None
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
            for mixer, state in zip(self.lightning, self.prefix_states):
                mixer.state[slot] = state
        else:
            for mixer in self.lightning:
                mixer.state[slot] = 0
            if request.with_system and self.prefix_writer is None and self.prefix_end > 0:
                run.writes_prefix, run.prefix_end = True, self.prefix_end
                self.prefix_writer = run
        return run

    def _save_prefix(self, run: Running) -> None:
        count = self.prefix_end // self.page_size
        self.prefix_pages = self.pages.share(run.pages[:count])  # the prefix cache's own reference
        self.prefix_states = [mixer.state[run.slot].clone() for mixer in self.lightning]
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
        tokens, lengths, starts, slots, tables = [], [], [], [], []
        for run, n in plan:
            grow = pages_for(run.cached + n, self.page_size) - len(run.pages)
            run.pages += self.pages.alloc(grow)
            first_written = run.cached // self.page_size
            for page in run.pages[first_written: pages_for(run.cached + n, self.page_size)]:
                self.pages.check_writable(page)
            tokens += run.next_tokens(n)
            lengths.append(n)
            starts.append(run.cached)
            slots.append(run.slot)
            tables.append(run.pages)
        batch = PackedBatch.build(lengths, starts, slots, tables, self.page_size, self.device)
        ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)[None]
        choices = self.model.forward_packed(ids, batch).argmax(-1).tolist()
        self.calls += 1
        for (run, n), token in zip(plan, choices):
            run.cached += n
            if run.writes_prefix and run.cached == run.prefix_end:
                self._save_prefix(run)
            if run.prefill_left == 0:  # the prompt is in: this logit row predicts the next token
                run.request.generated.append(token)

    def pages_in_use(self) -> tuple[int, int]:
        """(peak pages in use, pages in the pool)."""
        return self.pages.peak_used, self.pages.num_pages
