"""Host-side bookkeeping of a paged K|V pool: which pages are free, who holds each one.

Model-agnostic (plain Python, no tensors): a serving engine owns one
:class:`PageAllocator` per page pool (``init_paged_kv_cache``) and builds each
request's block table from the page ids it hands out. Pages carry reference
counts so that requests sharing a prefix point at the same pages: ``share``
adds a holder, ``free`` drops one, and a page goes back to the free list when
its last holder lets go.

Copy-on-write policy (what vLLM does): only FULL pages are ever shared. A
prefix that ends inside a page shares the pages before that one; its last
partial page's tokens are recomputed by each request into a page of its own.
So a shared page is never written again and no copy-on-write is needed;
:meth:`PageAllocator.check_writable` is the guard an engine calls before a write.
"""

from __future__ import annotations


class OutOfPages(RuntimeError):
    """``alloc`` asked for more pages than are free (nothing was allocated)."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold ``tokens`` tokens."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    if tokens < 0:
        raise ValueError(f"tokens must be non-negative, got {tokens}")
    return -(-tokens // page_size)


class PageAllocator:
    """Reference-counted page ids ``0 .. num_pages - 1``.

    ``alloc`` hands out the lowest free ids (so a quiet pool stays compact and
    runs are reproducible); every misuse (double free, sharing or freeing a page
    nobody holds, an id outside the pool) is a ``ValueError`` raised before any
    count changes.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or isinstance(num_pages, bool):
            raise TypeError(f"num_pages must be an int, got {type(num_pages).__name__}")
        if num_pages < 0:
            raise ValueError(f"num_pages must be non-negative, got {num_pages}")
        self.num_pages = num_pages
        self._refcounts = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest free id
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._refcounts[page]

    def alloc(self, count: int = 1) -> list[int]:
        """``count`` fresh pages, each with one holder (the caller)."""
        if count < 0:
            raise ValueError(f"alloc: count must be non-negative, got {count}")
        if count > len(self._free):
            raise OutOfPages(f"alloc: {count} pages requested, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._refcounts[page] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return pages

    def share(self, pages: list[int]) -> list[int]:
        """Adds a holder to each page (already held by someone); returns ``pages`` for the new holder's table."""
        for page in pages:
            self._check_held(page, "share")
        for page in pages:
            self._refcounts[page] += 1
        return list(pages)

    def free(self, pages: list[int]) -> None:
        """Drops one holder from each page; a page whose last holder left is free again."""
        drops: dict[int, int] = {}
        for page in pages:
            self._check_held(page, "free")
            drops[page] = drops.get(page, 0) + 1
            if drops[page] > self._refcounts[page]:
                raise ValueError(f"free: page {page} freed {drops[page]} times but has {self._refcounts[page]} "
                                 f"holder(s)")
        for page in pages:
            self._refcounts[page] -= 1
            if self._refcounts[page] == 0:
                self._free.append(page)
        self._free.sort(reverse=True)  # keep lowest-first order for alloc

    def check_writable(self, page: int) -> None:
        """A page may be written only by its single holder (shared pages are full and read-only)."""
        self._check_held(page, "write")
        if self._refcounts[page] != 1:
            raise ValueError(f"write: page {page} is shared by {self._refcounts[page]} holders; only full pages "
                             f"are shared and they are never written again")

    def _check_id(self, page: int) -> None:
        if not isinstance(page, int) or isinstance(page, bool):
            raise TypeError(f"page ids are ints, got {type(page).__name__}")
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is outside the pool [0, {self.num_pages})")

    def _check_held(self, page: int, what: str) -> None:
        self._check_id(page)
        if self._refcounts[page] == 0:
            raise ValueError(f"{what}: page {page} is not allocated")
