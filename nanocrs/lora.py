"""
LoRA, hand-written: low-rank adapters on a frozen pretrained GPT, plus trainable rows for new tokens.

Fine-tuning a pretrained backbone for recommendation adds tokens (semantic IDs, control tokens) at
the end of the vocabulary. Their embedding rows have to be learned from scratch, while the rest of
the network is adapted with LoRA: y = W x + (alpha / r) * B A dropout(x), W frozen, A (r, in) and
B (out, r) trained, B = 0 at the start so the adapted model begins exactly as the pretrained one.

    apply_lora(model, rank=16, alpha=32, dropout=0.05)       # freezes the model, wraps the projections
    train_new_token_rows(model, first_new_id=49152)           # rows >= 49152 become trainable
    opt = model.configure_optimizer(lr, weight_decay)         # only requires_grad params go in
    ... train ...
    checkpoint.save(out, model, config, opt)                  # stores only LoRA + new rows (safetensors)
    merge_lora(model)                                         # plain GPT again, base state-dict names

New token rows: the embedding (and the untied lm_head) is split into a frozen `base_rows` parameter
(rows < first_new_id) and a trainable `new_rows` parameter. The alternative, one trainable matrix
with a gradient hook that zeroes the old rows' gradient, is not safe: AdamW's decoupled weight decay
shrinks every parameter it is given whatever its gradient, so the "frozen" rows would drift unless
every caller remembered a no-decay group; it also keeps Adam state and full gradients for ~50k rows
that never move. With the split, the old rows are simply not given to any optimizer, so they stay
bit-identical with any optimizer or weight decay, and the optimizer state is for the new rows only.
merge_lora() concatenates the two back into one nn.Embedding / nn.Linear.

Dtypes: whatever the frozen base is stored in (bf16 for a big backbone on a GPU), everything this
file makes trainable (A, B, new rows) is fp32, so AdamW updates fp32 master weights. A step of
lr=1e-5 on a bf16 weight of size 0.02 is below half its rounding step (about 1.2e-4) and would be
lost. The low-rank path runs in fp32 (under autocast, in the autocast dtype) and its output is cast
back to the base's dtype, so the residual stream keeps one dtype.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocrs.nf4 import NF4Linear, dequantize_model

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TRAINABLE_SUFFIXES = ("lora_A", "lora_B", "new_rows")  # the parameters this file owns


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or a 4-bit NF4Linear, nanocrs/nf4.py: QLoRA) plus a trainable low-rank
    update: base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        assert rank > 0, "rank must be positive (rank 0 means: do not wrap)"
        self.base = base
        self.base.requires_grad_(False)
        device = base.packed.device if isinstance(base, NF4Linear) else base.weight.device
        # fp32 whatever the base's dtype: these are the master weights AdamW updates
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # A gets nn.Linear's own init; B = 0 makes the update zero at step 0 (the LoRA paper's choice)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        # x: (..., in). The low-rank path costs r * (in + out) per token instead of in * out. It runs
        # in the adapters' dtype (fp32) and is cast back to the base output's dtype. Under autocast
        # its matmuls run in the autocast dtype anyway, and x is left as it is: a cast copy per
        # wrapper would be saved for backward, where q/k/v (and gate/up) now share one input.
        y = self.base(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in) like base.weight, computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout aside). A 4-bit base is dequantized
        to its original dtype first: the update is folded into that, never re-quantized (4-bit steps
        would round most of it away)."""
        lin = self.base.to_linear() if isinstance(self.base, NF4Linear) else self.base
        with torch.no_grad():
            lin.weight.copy_((lin.weight.float() + self.delta_weight()).to(lin.weight.dtype))
        return lin

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _freeze_all_but_ours(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(_TRAINABLE_SUFFIXES))


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets=LORA_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets` in a LoRALinear, in place, and
    freeze every other parameter (new-token rows from train_new_token_rows stay trainable).
    Returns the wrapped module names. rank 0 = no LoRA: the model is left untouched (full fine-tuning)."""
    if rank < 0:
        raise ValueError(f"lora rank must be >= 0, got {rank}")
    if rank == 0:
        return []
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, NF4Linear)) and n.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"apply_lora: no nn.Linear or NF4Linear named one of {list(targets)} in the model")
    for n in names:
        _set_module(model, n, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    _freeze_all_but_ours(model)
    return names


# -----------------------------------------------------------------------------
# new token rows

class SplitEmbedding(nn.Module):
    """nn.Embedding whose rows >= first_new_id live in a separate trainable parameter."""

    def __init__(self, emb: nn.Embedding, first_new_id: int):
        super().__init__()
        w = emb.weight.detach()
        self.first_new_id = first_new_id
        self.base_rows = nn.Parameter(w[:first_new_id].clone(), requires_grad=False)  # (first, D), base dtype
        self.new_rows = nn.Parameter(w[first_new_id:].to(torch.float32, copy=True))  # (V - first, D), fp32

    @property
    def weight(self) -> torch.Tensor:
        # the whole (V, D) matrix in the base's dtype, for code that reads .weight (device/dtype, merging)
        return torch.cat([self.base_rows, self.new_rows.to(self.base_rows.dtype)])

    def forward(self, idx):
        # idx: (B, T). Look each id up in its own half and pick: no (V, D) concatenation per step.
        is_new = idx >= self.first_new_id
        old = F.embedding(idx.masked_fill(is_new, 0), self.base_rows)                   # (B, T, D)
        new = F.embedding((idx - self.first_new_id).clamp(min=0), self.new_rows)        # (B, T, D) fp32
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


class SplitHead(nn.Module):
    """The output head over the same split: logits = [x @ base_rows^T, x @ new_rows^T]."""

    def __init__(self, base_rows: nn.Parameter, new_rows: nn.Parameter):
        super().__init__()
        self.base_rows, self.new_rows = base_rows, new_rows  # shared with SplitEmbedding when tied

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base_rows, self.new_rows.to(self.base_rows.dtype)])

    def forward(self, x):
        # x: (B, T, D) -> (B, T, V) fp32; no gradient is ever computed for the frozen base rows. The
        # new tokens' logits (the semantic IDs that beam search ranks) are computed in fp32, outside
        # autocast: bf16 logits have steps of 0.125 at 20 and would round close scores into ties.
        base = F.linear(x, self.base_rows)
        with torch.autocast(x.device.type, enabled=False):
            new = F.linear(x.float(), self.new_rows)
        return torch.cat([base.float(), new], dim=-1)


def train_new_token_rows(model: nn.Module, first_new_id: int):
    """Make embedding rows >= first_new_id (and the same lm_head rows when untied) trainable, and
    only those: rows < first_new_id stay bit-identical through any optimizer (see the docstring)."""
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear), "new rows are already split"
    V = emb.weight.shape[0]
    if not 0 < first_new_id < V:
        raise ValueError(f"first_new_id must be in (0, {V}) (embedding rows), got {first_new_id}")
    tied = head.weight is emb.weight
    model.embed_tokens = SplitEmbedding(emb, first_new_id)
    if tied:
        model.lm_head = SplitHead(model.embed_tokens.base_rows, model.embed_tokens.new_rows)
    else:
        w = head.weight.detach()
        model.lm_head = SplitHead(nn.Parameter(w[:first_new_id].clone(), requires_grad=False),
                                  nn.Parameter(w[first_new_id:].to(torch.float32, copy=True)))


def merge_new_rows(model: nn.Module):
    """Undo train_new_token_rows: one nn.Embedding and nn.Linear again (re-tied if they were tied)."""
    emb, head = model.embed_tokens, model.lm_head
    if not isinstance(emb, SplitEmbedding):
        return
    tied = head.base_rows is emb.base_rows
    w = emb.weight.detach()  # (V, D)
    model.embed_tokens = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
    model.embed_tokens.weight = nn.Parameter(w)
    hw = head.weight.detach()
    model.lm_head = nn.Linear(hw.shape[1], hw.shape[0], bias=False, device=hw.device, dtype=hw.dtype)
    model.lm_head.weight = model.embed_tokens.weight if tied else nn.Parameter(hw)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W += scaling * B @ A), put plain nn.Linear
    modules back (4-bit ones dequantized) and merge split token rows, so state_dict() has the base
    model's names again. All parameters are left trainable=True, as in a freshly built model."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set_module(model, n, m.merged())
    dequantize_model(model)  # NF4 linears that no adapter wrapped
    merge_new_rows(model)
    model.requires_grad_(True)
    return model
