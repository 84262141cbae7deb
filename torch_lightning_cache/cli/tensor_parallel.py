"""``torchrun --nproc-per-node N -m torch_lightning_cache demo --tp N``: the demo's model split over N ranks."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from ..models.tensor_parallel import parallelize_hybrid_lm
from ..sharding import PartitionAxis, is_dtensor
from .common import OptionError, Progress, generate_with_cache


class DemoTensorParallel:
    """``torchrun --nproc-per-node N -m torch_lightning_cache demo --tp N``: the demo's model split over N ranks
    (gloo on the CPU, NCCL on GPUs), checked against the same model in one process."""

    def __init__(self, args, device: torch.device):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tp:
            raise OptionError(f"--tp {args.tp} needs {args.tp} processes, this is {world}: run "
                              f"torchrun --nproc-per-node {args.tp} -m torch_lightning_cache demo --tp {args.tp}")
        if args.heads % args.tp:
            raise OptionError(f"--heads ({args.heads}) must be a multiple of --tp ({args.tp})")
        self.args, self.device = args, device
        if device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank = dist.get_rank()
        from torch.distributed.device_mesh import init_device_mesh  # slow to import: --tp runs only

        self.mesh = init_device_mesh(device.type, (args.tp,), mesh_dim_names=("tp",))
        if self.rank != 0:  # one rank reports
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)

    @staticmethod
    def _bytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def parallelize(self, model):
        """Keeps a single-process copy for the comparison, then splits ``model`` over the ranks' heads."""
        self.reference = copy.deepcopy(model)
        full = (self._bytes(model.parameters()), self._bytes(model.cache_buffers()))
        parallelize_hybrid_lm(model, self.mesh, PartitionAxis(head_axis="tp"))
        local = (self._bytes(p.to_local() if is_dtensor(p) else p for p in model.parameters()),
                 self._bytes(model.cache_buffers()))
        every_rank = [None] * self.args.tp
        dist.all_gather_object(every_rank, local)
        print(f"tensor parallel: {self.args.tp} ranks ({dist.get_backend()}), heads split {self.args.heads // self.args.tp}"
              f" per rank; memory per rank (weights + caches): "
              + ", ".join(f"rank {r} {w / 2**20:.2f} + {c / 2**20:.2f} MiB" for r, (w, c) in enumerate(every_rank))
              + f"; one process: {full[0] / 2**20:.2f} + {full[1] / 2**20:.2f} MiB")
        return model

    def check(self, prompts, sequences, logits) -> bool:
        """Generates with the single-process model; True when the logits agree to 1e-5 (float32) and the
        tokens are identical. Ends the process group."""
        with torch.inference_mode():
            expected_sequences, expected = generate_with_cache(self.reference, prompts, self.args.tokens,
                                                               self.reference, Progress(1, "", False))
        worst = (logits - expected).abs().max().item()
        same = all(torch.equal(a, b) for a, b in zip(sequences, expected_sequences))
        tolerance = 1e-5 if logits.dtype == torch.float32 and self.reference.embed.weight.dtype == torch.float32 \
            else 0.1
        worst_all = torch.tensor([worst, float(not same)], dtype=torch.float64, device=self.device)
        dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)  # every rank's verdict
        worst, same = worst_all[0].item(), worst_all[1].item() == 0
        ok = worst <= tolerance and same
        print(f"tensor parallel check: max |logits with {self.args.tp} ranks - one process| = {worst:.3e} "
              f"(tolerance {tolerance:g}) {'PASS' if ok else 'FAIL'}; greedy tokens identical: {same}")
        # Every rank leaves the collective before any tears the group down: a rank that destroys its gloo
        # group while a peer's last all_reduce is still in flight aborts in gloo's worker thread at exit.
        dist.barrier()
        dist.destroy_process_group()
        return ok
