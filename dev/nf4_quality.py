"""
Is SmolLM2-135M's loss under NF4 (top-1 agreement 0.62, logits cosine 0.943, perplexity +31% in
tests/test_nf4.py) a defect of nanocrs/nf4.py or the model's sensitivity to 4-bit weights? On the same
200 positions of the same text, against the same 16-bit model (the GGUF's Q4_1 dequantized to fp32):

  1. NF4 at blocks 64 (nf4.py as shipped) / 32 / 16, a plain symmetric int4 absmax quantizer
     (levels -7..7, scale absmax/7) at blocks 64 / 32, int8 absmax (-127..127) at block 64, and a
     control: Gaussian noise added to every matrix at exactly NF4-64's per-matrix error.
     For each: mean relative Frobenius error over the 210 block matrices, top-1 agreement, mean logits
     cosine, perplexity ratio.
  2. NF4-64 on one kind of matrix at a time (q, k, v, o, gate, up, down), and attention / MLP only.
  3. nf4.py's quantize/dequantize against a from-scratch reference (codebook from the QLoRA paper's
     definition via statistics.NormalDist, nearest level by argmin, absmax per block), and the real
     NF4Linear model (quantize_model) against the fake-quantized one.

    OMP_NUM_THREADS=1 python dev/nf4_quality.py        # about 2 minutes on one CPU thread

Results and their reading: docs/scaling.md, "NF4 quality on SmolLM2-135M".
"""

import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanocrs import nf4  # noqa: E402
from nanocrs.backbone import load_base  # noqa: E402
from test_nf4 import TEXT  # noqa: E402  the test's 200 positions


# -----------------------------------------------------------------------------
# quantizers: weight -> dequantized weight (fp32), all written here from scratch

def paper_nf4_levels() -> torch.Tensor:
    """QLoRA's NF4 codebook from its definition: 8 positive levels at the normal quantiles of
    linspace(1 - d, 1/2, 9)[:-1], 7 negative at -quantiles of linspace(1 - d, 1/2, 8)[:-1], and 0,
    d = (1/30 + 1/32) / 2, divided by the largest. float64, via statistics (not torch.special)."""
    q = statistics.NormalDist().inv_cdf
    d = 0.5 * (1 / 30 + 1 / 32)
    pos = [q((1 - d) + i * (0.5 - (1 - d)) / 8) for i in range(8)]
    neg = [-q((1 - d) + i * (0.5 - (1 - d)) / 7) for i in range(7)]
    levels = sorted(neg + [0.0] + pos)
    return torch.tensor([v / max(levels) for v in levels], dtype=torch.float64)


REF_LEVELS = paper_nf4_levels()


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    flat = w.detach().double().reshape(-1)
    assert flat.numel() % block == 0  # every SmolLM2 matrix is a whole number of blocks
    return flat.view(-1, block)


def ref_nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """absmax per block, nearest NF4 level by argmin (ties to the lower level), level * absmax."""
    b = _blocks(w, block)
    absmax = b.abs().amax(1, keepdim=True)
    scaled = b / torch.where(absmax > 0, absmax, 1.0)
    idx = (scaled[..., None] - REF_LEVELS).abs().argmin(-1)
    return (REF_LEVELS[idx] * absmax).view(w.shape).float()


def absmax_int(w: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """Symmetric uniform absmax: levels -qmax..qmax, scale absmax / qmax, round to nearest."""
    b = _blocks(w, block)
    s = b.abs().amax(1, keepdim=True) / qmax
    s = torch.where(s > 0, s, 1.0)
    return (torch.round(b / s).clamp(-qmax, qmax) * s).view(w.shape).float()


def shipped_nf4(w: torch.Tensor) -> torch.Tensor:
    return nf4.dequantize(*nf4.quantize(w), w.shape)


def rel_err(w: torch.Tensor, wq: torch.Tensor) -> float:
    return ((wq.double() - w.double()).norm() / w.double().norm()).item()


# -----------------------------------------------------------------------------

def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_base("smollm2")
    model.eval()
    ids = tok.encode(TEXT)
    x, y = torch.tensor([ids[:200]]), torch.tensor(ids[1:201])
    lins = {n: m for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert len(lins) == 210
    orig = {n: m.weight.detach().clone() for n, m in lins.items()}
    ident = {id(w): n for n, w in orig.items()}  # weight tensor -> its name
    kind = {n: n.rsplit(".", 1)[-1].replace("_proj", "") for n in lins}  # q k v o gate up down

    @torch.no_grad()
    def logits():
        return model(x)[0][0]  # (200, V)

    ref = logits()
    ppl16 = math.exp(F.cross_entropy(ref, y).item())

    def compare(b):
        agree = (ref.argmax(-1) == b.argmax(-1)).float().mean().item()
        cos = F.cosine_similarity(ref, b, dim=-1).mean().item()
        return agree, cos, math.exp(F.cross_entropy(b, y).item()) / ppl16

    @torch.no_grad()
    def run(qfn, which=lambda n: True):
        """Replace the chosen matrices by qfn(W), measure, restore. -> (mean rel err, agree, cos, ppl ratio)."""
        errs = []
        for n, m in lins.items():
            if which(n):
                wq = qfn(orig[n])
                errs.append(rel_err(orig[n], wq))
                m.weight.copy_(wq)
        b = logits()
        for n, m in lins.items():
            m.weight.copy_(orig[n])
        return (statistics.mean(errs), *compare(b)), b

    # ---- 3. nf4.py against the from-scratch reference
    assert torch.equal(nf4.LEVELS.double().sub(REF_LEVELS).abs().le(1e-7), torch.ones(16, dtype=torch.bool))
    # A weight whose scaled value sits on the midpoint between two levels (up to fp32 rounding) may
    # take either level: the fp32 implementation and this fp64 reference then differ by a level gap,
    # with the same error. So compare the per-weight errors |w - Q(w)|, and count those level changes.
    max_diff = max_err_diff = max_scale_diff = 0.0
    mismatched = 0
    nf4_err = {}
    for n, w in orig.items():
        got, want, wd = shipped_nf4(w).double(), ref_nf4(w).double(), w.double()
        max_diff = max(max_diff, (got - want).abs().max().item())
        max_err_diff = max(max_err_diff, ((got - wd).abs() - (want - wd).abs()).abs().max().item())
        mismatched += int(((got - want).abs() > 1e-6 * w.abs().max()).sum())
        max_scale_diff = max(max_scale_diff, (nf4.quantize(w)[1].double()
                                              - _blocks(w, 64).abs().amax(1)).abs().max().item())
        nf4_err[n] = rel_err(w, got)
    n_weights = sum(w.numel() for w in orig.values())
    print(f"\n[3] nf4.py vs from-scratch reference over all 210 matrices ({n_weights / 1e6:.1f}M weights): "
          f"levels max |diff| {(nf4.LEVELS.double() - REF_LEVELS).abs().max().item():.1e}, "
          f"scales max |diff| {max_scale_diff:.1e}, per-weight error | |w - nf4.py(w)| - |w - ref(w)| | "
          f"max {max_err_diff:.1e}; dequantized values: {mismatched} weights on the other level of a tie "
          f"(max |diff| {max_diff:.2f}), all others max |diff| <= 1e-6 x absmax")

    # ---- 1. quantizers over all 210 matrices
    rows = [("NF4, block 64 (nf4.py as shipped)", shipped_nf4),
            ("NF4, block 32", lambda w: ref_nf4(w, 32)),
            ("NF4, block 16", lambda w: ref_nf4(w, 16)),
            ("int4 absmax -7..7, block 64", lambda w: absmax_int(w, 64, 7)),
            ("int4 absmax -7..7, block 32", lambda w: absmax_int(w, 32, 7)),
            ("int8 absmax -127..127, block 64", lambda w: absmax_int(w, 64, 127))]
    results, fake_nf4 = [], None
    for name, fn in rows:
        r, b = run(fn)
        results.append((name, *r))
        fake_nf4 = b if fake_nf4 is None else fake_nf4
    # control: i.i.d. Gaussian noise with exactly NF4-64's relative error, matrix by matrix
    g = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(w.shape, generator=g) * (nf4_err[n] * w.norm() / math.sqrt(w.numel()))
             for n, w in orig.items()}
    r, _ = run(lambda w: w + noise[ident[id(w)]])
    results.append(("Gaussian noise at NF4-64's error", *r))

    # Gaussian weights: the quantizers' error on the data NF4 is designed for
    gw = torch.randn(576, 1536, generator=torch.Generator().manual_seed(1)) * 0.02
    gauss = {"NF4, block 64 (nf4.py as shipped)": rel_err(gw, shipped_nf4(gw)),
             "NF4, block 32": rel_err(gw, ref_nf4(gw, 32)), "NF4, block 16": rel_err(gw, ref_nf4(gw, 16)),
             "int4 absmax -7..7, block 64": rel_err(gw, absmax_int(gw, 64, 7)),
             "int4 absmax -7..7, block 32": rel_err(gw, absmax_int(gw, 32, 7)),
             "int8 absmax -127..127, block 64": rel_err(gw, absmax_int(gw, 64, 127))}

    print(f"\n[1] SmolLM2-135M, 200 positions, against the 16-bit model (perplexity {ppl16:.2f}); "
          f"all 210 block matrices quantized")
    print("| weights | rel. Frobenius error (mean of 210) | same on N(0,1) weights | top-1 agreement "
          "| logits cosine | perplexity ratio |")
    print("|---|---|---|---|---|---|")
    for name, err, agree, cos, ppl in results:
        ge = f"{gauss[name]:.4f}" if name in gauss else "-"
        print(f"| {name} | {err:.4f} | {ge} | {agree:.3f} | {cos:.4f} | {ppl:.3f} |")

    # ---- 2. one kind at a time (NF4 block 64)
    groups = [(k, (lambda k: lambda n: kind[n] == k)(k)) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    groups += [("attention (q k v o)", lambda n: kind[n] in ("q", "k", "v", "o")),
               ("MLP (gate up down)", lambda n: kind[n] in ("gate", "up", "down"))]
    print("\n[2] NF4 block 64 on one kind of matrix only (the rest 16-bit)")
    print("| quantized | params | rel. Frobenius error | top-1 agreement | logits cosine | perplexity ratio |")
    print("|---|---|---|---|---|---|")
    for k, which in groups:
        params = sum(orig[n].numel() for n in lins if which(n))
        (err, agree, cos, ppl), _ = run(shipped_nf4, which)
        print(f"| {k} | {params / 1e6:.1f}M | {err:.4f} | {agree:.3f} | {cos:.4f} | {ppl:.3f} |")

    # ---- 3b. the real NF4Linear model gives what the fake-quantized weights give
    nf4.quantize_model(model)
    with torch.no_grad():
        real = logits()
    agree, cos, ppl = compare(real)
    print(f"\n[3b] quantize_model (NF4Linear) vs fake-quantized nf4.py weights: max |logit diff| "
          f"{(real - fake_nf4).abs().max().item():.1e}; NF4Linear model: agreement {agree:.3f}, "
          f"cosine {cos:.4f}, perplexity ratio {ppl:.3f}")


if __name__ == "__main__":
    main()
