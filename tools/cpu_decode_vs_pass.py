"""CPU lightning_decode at large batch vs one in-place pass over the same state.

A decode step reads and writes the whole state once (S = lam S + k^T v, o = q S),
so its floor is one read-modify-write pass over the state; ``state.mul_(c)``
is that pass. Both run in this process, interleaved (decode, pass, decode, ...)
so machine load hits them alike; the ratio printed is the median of the
per-round ratios.

    python3 tools/cpu_decode_vs_pass.py [--batch 64 --heads 16 --dim 128 --rounds 30]

Run from the repository root after an in-place build.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import torch_lightning_cache as tlc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="input dtypes (the state is float32)")
    args = parser.parse_args()

    B, H, D = args.batch, args.heads, args.dim
    gen = torch.Generator().manual_seed(0)
    state = 0.1 * torch.randn(B, H, D, D, generator=gen)
    slopes = tlc.lightning_slopes(H)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, state {tuple(state.shape)} float32 "
          f"({state.numel() * 4 / 1e6:.0f} MB), load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(args.inner):
            fn()
        return (time.perf_counter() - start) / args.inner

    def one_pass():
        state.mul_(0.999)

    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        q, k, v = (torch.randn(B, 1, H, D, generator=gen).to(dtype) for _ in range(3))

        def decode():
            torch.ops.lightning_cache.lightning_decode(state, q, k, v, slopes, None, 1.0, False)

        decode(), one_pass()  # warm up
        dec, pas = [], []
        for _ in range(args.rounds):
            dec.append(timed(decode))
            pas.append(timed(one_pass))
        ratio = statistics.median(d / p for d, p in zip(dec, pas))
        print(f"{name:>9} inputs: decode {statistics.median(dec) * 1e3:7.3f} ms, state.mul_ pass "
              f"{statistics.median(pas) * 1e3:7.3f} ms (medians), decode / pass = {ratio:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
