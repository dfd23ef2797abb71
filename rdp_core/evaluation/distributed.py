"""Sharding over processes and machines with torch.distributed, when launched by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a plain `rdp-core eval`) the run is one
process. The process group uses NCCL when every process has a GPU and gloo otherwise (the CPU test runs two
gloo processes). Images are dealt round-robin, index i to rank i % world_size, so each is evaluated once.
"""
import os

import torch
import torch.distributed as dist


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env():
    """Joins the process group torchrun describes (once); returns the device this process should use, or None."""
    if not launched_by_torchrun():
        return None
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
