"""
How much the 4-bit base costs in time: NF4Linear (dequantize the whole matrix, then one matmul) against
the plain nn.Linear of the same dtype, forward only, at 4096 x 4096, for a few batch sizes (tokens).
The median of --runs timings each; the ratio is NF4 / plain. Figures and their reading: docs/scaling.md.

    python dev/nf4_speed.py                      # one CPU thread, bf16 and fp32, tokens 1, 32, 256
    python dev/nf4_speed.py --device cuda --tokens 1,512,6144 --threads 0
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from nanocrs.nf4 import NF4Linear  # noqa: E402


def median_seconds(fn, runs: int, device: torch.device) -> float:
    fn()  # warmup (allocator, the level table on the device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_nf4(size: int = 4096, tokens=(1, 32, 256), dtypes=(torch.bfloat16, torch.float32), runs: int = 5,
              device="cpu") -> list[dict]:
    """[{dtype, tokens, plain_ms, nf4_ms, dequant_ms, ratio}] for a size x size layer."""
    device = torch.device(device)
    torch.manual_seed(0)
    rows = []
    for dtype in dtypes:
        lin = nn.Linear(size, size, bias=False, device=device, dtype=dtype)
        q = NF4Linear.from_linear(lin)
        dq = median_seconds(lambda: q.dequantize(dtype), runs, device)
        for n in tokens:
            x = torch.randn(n, size, device=device, dtype=dtype)
            plain = median_seconds(lambda: lin(x), runs, device)
            quant = median_seconds(lambda: q(x), runs, device)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": n, "plain_ms": plain * 1e3,
                         "nf4_ms": quant * 1e3, "dequant_ms": dq * 1e3, "ratio": quant / plain})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tokens", default="1,32,256", help="comma-separated batch sizes (rows of x)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = bench_nf4(a.size, [int(t) for t in a.tokens.split(",")], runs=a.runs, device=a.device)
    print(f"{a.size} x {a.size} linear on {a.device} ({torch.get_num_threads()} threads), median of {a.runs}")
    print(f"{'dtype':>8} {'tokens':>6} {'plain ms':>9} {'nf4 ms':>9} {'dequant ms':>10} {'nf4/plain':>9}")
    for r in rows:
        print(f"{r['dtype']:>8} {r['tokens']:>6} {r['plain_ms']:>9.2f} {r['nf4_ms']:>9.2f} {r['dequant_ms']:>10.2f} "
              f"{r['ratio']:>9.2f}")


if __name__ == "__main__":
    main()
