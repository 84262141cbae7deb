"""Command line: ``python -m torch_lightning_cache {demo,bench,info}``."""

from __future__ import annotations

import argparse
import sys

import torch

from . import build_info
from .cli import bench, demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_lightning_cache",
                                     description="Lightning-attention cache operators: demo, benchmark, build info.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="generate tokens with a small hybrid model and check the cache"))
    bench.add_arguments(sub.add_parser("bench", help="time the ops against pure-PyTorch eager and torch.compile"))
    sub.add_parser("info", help="print how the operator library was built")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "bench":
        return bench.run(args)
    print(f"torch {torch.__version__}, operator library: {build_info()}, "
          f"CUDA available: {torch.cuda.is_available()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
