"""
The plumbing every script shares: where to compute (device, threads, torchrun's processes, the
autocast dtype), printing once, atomic file writes and the scripts' one-line errors.

    device = init_device(args.device, args.threads)                    # sample.py, dev/bench.py
    c = init_training(a.device, a.threads, a.dtype, a.deterministic)   # train.py: + DDP, dtype, TF32
    print0(f"model: ...")                                              # rank 0 only
    with atomic_path("out/x.json") as tmp:                             # a reader sees the old file or the new one
        write_something(tmp)
    if __name__ == "__main__":
        run_script(main)                                               # bad input: "error: ..." and exit 1
"""

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# compute setup

def init_device(device: str = "auto", threads: int = 0) -> str:
    """Set torch's CPU threads (0: its default) and resolve "auto" to cuda if there is one, else cpu."""
    if threads:
        torch.set_num_threads(threads)
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Compute:
    device: str               # "cpu", "cuda:1", ...
    device_type: str          # "cpu" or "cuda"
    dtype: str                # "float32" or "bfloat16": autocast's and a backbone's frozen weights'
    ddp: bool = False         # under torchrun with more than one process
    rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:  # the process that prints, logs and saves
        return self.rank == 0

    @property
    def base_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()


def init_training(device: str = "auto", threads: int = 0, dtype: str = "auto", deterministic: bool = False) -> Compute:
    """init_device, then join torchrun's process group (if any), pick the autocast dtype (auto: bf16 on
    CUDA, fp32 elsewhere), allow TF32 matmuls on CUDA and, if asked, deterministic kernels."""
    device = init_device(device, threads)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    # torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (NCCL), or per CPU worker (gloo)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        if device_type == "cuda":  # bind the process to its GPU first, and tell NCCL which one it is
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                device_id=torch.device(device) if device_type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    dtype = dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic workspaces
        torch.use_deterministic_algorithms(True)
        if device_type == "cuda":
            torch.backends.cuda.enable_flash_sdp(False)  # its backward accumulates in a varying order
    return Compute(device, device_type, dtype, ddp, rank, world)


def cleanup(c: Compute):
    if c.ddp and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on the first process only (torchrun's RANK 0, or no torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# files and errors

@contextmanager
def atomic_path(path, fsync: bool = False, suffix: str = ".tmp"):
    """Yields a temporary name beside path; once the block has written it, it is (flushed to disk if
    fsync, then) renamed onto path, atomically on POSIX and Windows: a reader, or a crash, sees the old
    file or the new one, never half of one. If the block raises, the temporary file is removed."""
    tmp = str(path) + suffix
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)


def flag_error(msg: str):
    """A flag out of range: one line and exit code 2, as argparse does for a malformed one."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run_script(main):
    """A script's entry point: bad input (ValueError, which DataError, CheckpointError and TrainingError
    are) or a path that can not be read or written (OSError) is one line on stderr and exit code 1,
    not a traceback."""
    try:
        main()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
