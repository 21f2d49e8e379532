"""
The plumbing every script shares: where to compute (device, threads, torchrun's processes, the
autocast dtype), printing once, atomic file writes and the scripts' one-line errors.

    device = init_device(args.device, args.threads)                    # sample.py, dev/bench.py
    c = init_training(a.device, a.threads, a.dtype, a.deterministic)   # train.py: + DDP, dtype, TF32
    print0(f"model: ...")                                              # rank 0 only
    with atomic_path("out/x.json") as tmp:                             # a reader sees the old file or the new one
        write_something(tmp)
    check_flags(a, {"dropout": (0, 1, "[)"), "threads": (0, None)})   # after parse_args: one line, exit 2
    check_knobs(json.load(f), "CKPT/calibration.json")                 # decoding knobs: finite, in range
    print(escape_terminal(title))                                      # catalogue text can not drive the terminal
    if __name__ == "__main__":
        run_script(main)                                               # bad input: "error: ..." and exit 1
"""

import fcntl
import math
import os
import re
import secrets
import sys
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# compute setup

def init_device(device: str = "auto", threads: int = 0) -> str:
    """Set torch's CPU threads (0: its default) and resolve "auto" to cuda if there is one, else cpu."""
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str):
    """A --device this torch can run on, or one line saying why not (torch's own errors come later, as
    tracebacks, or for a CUDA device on a CPU build only at the first tensor moved there)."""
    m = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", device)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: this torch sees no CUDA device (a CPU build, or no GPU): use --device cpu")
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise ValueError(f"--device {device}: there are {n} CUDA devices (cuda:0 to cuda:{n - 1})")
    if m.group(1) == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: this torch has no MPS device: use --device cpu")


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

TMP_NAME = re.compile(r"^(.+)\.[0-9a-f]{8}\.tmp$")  # what exclusive_tmp names: FILE.<8 hex>.tmp


def exclusive_tmp(path, suffix: str = ".tmp") -> str:
    """A new empty file beside path with a name no one else has (FILE.<8 random hex>.tmp), created
    exclusively: a file or symlink already there (a leftover, or one planted to redirect the write) is
    never opened, so nothing outside the target folder can be written through it."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = f"{path}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OSError(f"{path}: could not create a temporary file beside it")


@contextmanager
def atomic_path(path, fsync: bool = False, suffix: str = ".tmp"):
    """Yields a temporary name beside path (exclusive_tmp); once the block has written it, it is
    (flushed to disk if fsync, then) renamed onto path, atomically on POSIX and Windows: a reader, or a
    crash, sees the old file or the new one, never half of one. If the block raises, the temporary
    file is removed. A kill leaves FILE.<hex>.tmp behind, which TMP_NAME recognises for clean-up."""
    tmp = exclusive_tmp(path, suffix)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


_HELD = {}  # folder -> weak reference to this process' FolderLock on it


def lock_folder(folder: str, name: str, what: str) -> "FolderLock":
    """FolderLock(folder, name, what). A script's main() can run again in one process (tests): a lock
    its earlier run still holds (kept alive by a traceback) is released first. The caller keeps the
    returned lock for as long as it writes; dropping it releases the folder."""
    key = os.path.realpath(folder)
    old = _HELD.pop(key, lambda: None)()
    if old is not None:
        old.release()
    lock = FolderLock(folder, name, what)
    _HELD[key] = weakref.ref(lock)
    return lock


class FolderLock:
    """One process at a time per output folder: an exclusive flock on FOLDER/NAME, held until release()
    or the process ends (the kernel drops it then, so a killed run never leaves a stale lock). The
    file keeps the holder's pid, for the message a second process gets."""

    def __init__(self, folder: str, name: str, what: str):
        path = os.path.join(folder, name)
        self.fd = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"{folder}: another {what} (pid {holder}) is writing into it; wait for it to end, "
                             "or choose another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    __del__ = release


# the files a checkpoint (train.py, sample.py --calibrate) or a dataset (data_prep.py) is made of: an
# output flag never names one of them (sample.py --json C/config.json would destroy the checkpoint)
OWN_FILES = {"config.json", "tokenizer.json", "sids.json", "items.jsonl", "log.jsonl", "calibration.json", "intent.json",
             "text_prior.npz", "train.lock", "dataset.json", "train.jsonl", "val.jsonl", "test.jsonl",
             "item_embeddings.npy"}
_OWN_PATTERN = re.compile(r"^(model|optimizer)-\d+\.safetensors$")


def check_output(path: str, flag: str):
    """Refuse an output path that is a file of a checkpoint or dataset folder (one with config.json or
    dataset.json), before any work is done; new files beside them (eval_test.json) are fine."""
    folder, name = os.path.split(os.path.abspath(path))
    ours = name in OWN_FILES or _OWN_PATTERN.match(name) or TMP_NAME.match(name)
    if ours and any(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "dataset.json")):
        raise ValueError(f"{flag} {path}: that is one of the files of the checkpoint or dataset in {folder}; "
                         "write the output under another name")


# -----------------------------------------------------------------------------
# values from outside (flags, JSON, npz): checked once, where they come in

def _interval(lo, hi, bounds: str) -> str:
    if hi is None:
        return f"at least {lo}" if bounds[0] == "[" else f"above {lo}"
    if lo is None:
        return f"at most {hi}" if bounds[1] == "]" else f"below {hi}"
    return f"in {bounds[0]}{lo}, {hi}{bounds[1]}"


def out_of_range(value, lo=None, hi=None, bounds: str = "[]", integer: bool = False) -> str | None:
    """Why value is not a finite number (an int if `integer`) within lo..hi (bounds "[]", "[)", "(]" or
    "()"; None: unbounded), or None if it is. Booleans and NaN are never numbers here."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    low_ok = lo is None or (value > lo if bounds[0] == "(" else value >= lo)
    high_ok = hi is None or (value < hi if bounds[1] == ")" else value <= hi)
    if not (low_ok and high_ok):
        return f"must be {_interval(lo, hi, bounds)}, got {value!r}"
    return None


def check_flags(a, ranges: dict):
    """After parse_args: every float flag finite (argparse's float() takes "nan" and "inf"), and each
    flag in `ranges` ({name: (lo, hi) or (lo, hi, bounds)}) within them; else one line, exit code 2."""
    for name, value in vars(a).items():
        spec = ranges.get(name)
        if isinstance(value, float) or (spec is not None and value is not None):
            lo, hi, bounds = (tuple(spec) + ("[]",))[:3] if spec is not None else (None, None, "[]")
            why = out_of_range(value, lo, hi, bounds, integer=isinstance(value, int))
            if why:
                flag_error(f"--{name.replace('_', '-')} {why}")


# the decoding knobs (nanocrs/session.py Knobs, nanocrs/heads.py): from --knob or calibration.json.
# A NaN or infinite one does not fail anywhere: it empties every beam list, and the eval reports zeros.
KNOBS = {"copy_bias": (None, None, "[]"), "just_named_bias": (None, None, "[]"), "text_prior": (0, None, "[]"),
         "rec_threshold": (0, 1, "[]")}


def check_knobs(knobs: dict, where: str, flags: bool = False):
    """Each decoding knob present in `knobs` (None: not set) a finite number in its range (KNOBS); one
    line naming `where` (a file) and the key, or with flags=True the flag, with exit code 2."""
    for key, (lo, hi, bounds) in KNOBS.items():
        if knobs.get(key) is None:
            continue
        why = out_of_range(knobs[key], lo, hi, bounds)
        if why and flags:
            flag_error(f"--{key.replace('_', '-')} {why}")
        if why:
            raise ValueError(f"{where}: {key} {why}")


# C0 and C1 controls (ESC starts ANSI sequences), DEL, and the bidirectional overrides and isolates
# (U+202A-202E, U+2066-2069; LRM/RLM/ALM too) that reorder what a terminal shows
_TERMINAL_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_terminal(text: str) -> str:
    """Text from a catalogue or a model, safe to print: every control character as a visible escape
    (\\x1b, \\u202e), so a title can not move the cursor, recolour or rewrite the screen."""
    return _TERMINAL_CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


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
