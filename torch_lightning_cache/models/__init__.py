"""Models built on the cache: the hybrid decoder and its tensor-parallel form."""
