"""
QLoRA's frozen base: the block matrices of a pretrained backbone stored in 4-bit NormalFloat (NF4),
dequantized to the compute dtype inside every forward and backward. LoRA and the new token rows
train on top of it exactly as over a 16-bit base (nanocrs/lora.py).

    python train.py --data data/synthetic --out out/qsmol --init-from smollm2 --quantize nf4 --lora-rank 16
    model, tok = load_hf("/models/Llama-3.1-8B-Instruct", device="cuda", quantize="nf4")  # streamed, 4-bit
    quantize_model(model)                                  # an already loaded GPT: block linears -> NF4Linear

NF4 (Dettmers et al., QLoRA, 2023). Pretrained weights are close to zero-mean normal, so the 16 levels
sit at quantiles of N(0, 1), each level holding about as many weights: an information-theoretically
fair 4-bit code for normal data. The paper makes zero exact by building the two halves apart: 8
positive levels at the quantiles of linspace(1 - d, 1/2, 9) (1/2 itself, the zero, dropped), 7
negative ones at the mirrored linspace(1 - d, 1/2, 8), plus 0, with d = (1/30 + 1/32) / 2 so the
outermost level is not at an infinite quantile. All 16 are divided by the largest, so they span
[-1, 1]. A weight matrix is flattened (row-major) and cut into blocks of 64; each block stores its
absmax as an fp32 scale and each weight the index of the level nearest to weight / absmax; two
4-bit indices are packed into one byte. That is 4 + 32/64 = 4.5 bits per weight. The paper's double
quantization (the fp32 scales themselves quantized to 8 bits in blocks of 256, 4.127 bits a weight)
is NOT done here: it saves 0.37 bits a weight, about 0.3 GiB on an 8B model, for a second codebook.

What is quantized: every nn.Linear inside model.layers (q/k/v/o/gate/up/down), which is where almost
all of a backbone's parameters are. The embedding and the output head stay 16-bit (their new rows fp32,
nanocrs/lora.py), the q/k/v biases (Qwen2.5) too. The norm weights keep the checkpoint's 16-bit values
(storing a bf16 checkpoint's value in fp32 adds nothing) and RMSNorm computes in fp32 anyway.

Memory at run time: NF4Linear keeps only the packed codes and the scales. forward and backward each
dequantize the whole matrix into a temporary in the compute dtype (about 4 bytes a weight at the peak
of the lookup, one matrix at a time) and drop it; the custom autograd function saves no activation
and no dequantized weight, only references to the 4-bit buffers, so the activations are those of a
16-bit frozen base (nanocrs/memplan.py counts both). There is no fused 4-bit matmul kernel here
(bitsandbytes has one): the dequantization is a separate, memory-bound pass; see docs/scaling.md.

Loading streams: load_hf(quantize="nf4") builds the GPT on the meta device with empty NF4Linear
shells in place of the block linears, reads one tensor at a time from its shard, moves it to the
device and quantizes it there, so neither host nor GPU ever holds the 16-bit model.

Footgun: the scales are an fp32 buffer, and model.to(torch.bfloat16) would cast them like any
floating-point buffer; move a quantized model with .to(device) only.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64           # weights per absmax scale (the QLoRA paper's block size)
QUANTIZE_CHOICES = ("none", "nf4")


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0: (16,) fp32 (see the docstring)."""
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])   # 8 levels > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    levels = levels / levels.max()
    assert levels.shape == (16,) and levels[0] == -1 and levels[-1] == 1 and levels[7] == 0
    return levels.float()


LEVELS = nf4_levels()
MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2  # (15,) a scaled weight takes the level of its bucket
# byte b holds two codes, b >> 4 first: PAIRS[b] = (LEVELS[b >> 4], LEVELS[b & 15]). A lookup per byte
# instead of per code halves the index tensor, the largest temporary of dequantize().
_B = torch.arange(256)
PAIRS = torch.stack([LEVELS[_B >> 4], LEVELS[_B & 15]], dim=1)  # (256, 2) fp32


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shaped weight -> (packed codes (n_blocks * 32,) uint8, absmax scales (n_blocks,) fp32),
    on w's device. The flattened weight is zero-padded to whole blocks; dequantize() drops the padding."""
    flat = w.detach().reshape(-1).float()  # an fp32 copy of this one tensor only
    pad = -flat.numel() % BLOCK
    if pad:
        flat = F.pad(flat, (0, pad))
    blocks = flat.view(-1, BLOCK)                                              # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)                                          # (n_blocks,)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]           # in [-1, 1]
    codes = torch.bucketize(scaled, MIDPOINTS.to(w.device), out_int32=True)   # (n_blocks, 64) in 0..15
    codes = codes.view(-1, 2)                                                  # (n_blocks * 32, 2)
    packed = (codes[:, 0] << 4 | codes[:, 1]).to(torch.uint8)
    return packed, absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """The inverse of quantize(): a (shape) tensor in dtype, level * absmax per weight."""
    numel = math.prod(shape)
    w = _pairs_on(packed.device, dtype).index_select(0, packed.int())  # (n_blocks * 32, 2): two weights a byte
    w = w.view(-1, BLOCK).mul_(absmax.to(dtype)[:, None])   # (n_blocks, 64), in place: no second copy
    return w.view(-1)[:numel].view(shape)


_PAIRS_CACHE = {}


def _pairs_on(device, dtype):
    # the (256, 2) table in this dtype on this device, made once rather than at every matmul
    key = (str(device), dtype)
    if key not in _PAIRS_CACHE:
        _PAIRS_CACHE[key] = PAIRS.to(device=device, dtype=dtype)
    return _PAIRS_CACHE[key]


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W rebuilt from its 4-bit codes in forward and again in backward. Only the 4-bit
    buffers are saved, never x (a frozen W needs no weight gradient) nor the dequantized W."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return F.linear(x, dequantize(packed, absmax, shape, x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax = ctx.saved_tensors
        grad_x = grad_out @ dequantize(packed, absmax, ctx.shape, grad_out.dtype)  # (..., out) @ (out, in)
        return grad_x, None, None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4. dtype: the 16-bit (or fp32) dtype the weight
    came in, which is what to_linear() gives back; forward computes in the autocast dtype when
    autocast is on, else in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        n_blocks = math.ceil(in_features * out_features / BLOCK)
        self.register_buffer("packed", torch.zeros(n_blocks * BLOCK // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "NF4Linear":
        w = lin.weight
        q = cls(lin.in_features, lin.out_features, False, w.dtype, w.device)
        q.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        q.quantize_(w)
        return q

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor):
        """Store w (out, in) in 4 bits on w's device (this replaces the buffers: a meta shell becomes real)."""
        assert w.shape == (self.out_features, self.in_features), f"weight {tuple(w.shape)} for {self}"
        self.packed, self.absmax = quantize(w)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return dequantize(self.packed, self.absmax, (self.out_features, self.in_features), dtype or self.dtype)

    def forward(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        y = _DequantLinear.apply(x.to(dtype), self.packed, self.absmax, (self.out_features, self.in_features))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight in self.dtype (for merging and export)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.packed.device, dtype=self.dtype)
        lin.weight.copy_(self.dequantize())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


# -----------------------------------------------------------------------------
# whole models

def check_quantize(quantize: str, init_from: str, lora_rank: int):
    """The one place the --quantize flag is validated: one line naming the flag when it can not apply."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize}: one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "nf4" and not init_from:
        raise ValueError("--quantize nf4 (the gcrs-* presets set it) stores a pretrained backbone in 4 bits: "
                         "it needs --init-from")
    if quantize == "nf4" and lora_rank <= 0:
        raise ValueError("--quantize nf4 freezes the base in 4 bits, which can not train: it needs --lora-rank > 0")


def _block_linears(model: nn.Module) -> list[str]:
    return [f"layers.{n}" for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_model(model: nn.Module) -> list[str]:
    """Replace every nn.Linear inside model.layers by an NF4Linear, one matrix at a time (each 16-bit
    weight is freed as soon as its module is replaced). Returns the module names."""
    names = _block_linears(model)
    for n in names:
        _set_module(model, n, NF4Linear.from_linear(model.get_submodule(n)))
    return names


def meta_shells(model: nn.Module, dtype) -> dict[str, NF4Linear]:
    """On a GPT built on the meta device: put an empty NF4Linear where every block linear is, and return
    {weight name: shell}, e.g. {"layers.0.self_attn.q_proj.weight": ...}. The loader then quantizes each
    weight into its shell as it reads it (shell.quantize_) and sets the bias as an ordinary parameter."""
    shells = {}
    for n in _block_linears(model):
        lin = model.get_submodule(n)
        shell = NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype, device="meta")
        _set_module(model, n, shell)
        shells[n + ".weight"] = shell
    return shells


def dequantize_model(model: nn.Module):
    """Every NF4Linear back to an nn.Linear (its weight dequantized), in place."""
    for n, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            _set_module(model, n, m.to_linear())
