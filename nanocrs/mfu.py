"""
Model FLOPs utilisation: the FLOPs a training step needs, counted from the model as it is (LoRA,
frozen weights, new token rows) and the real batch, over the GPU's dense bf16 peak.

    flops = train_flops(model, seq_lens=[431, 612, ...], n_supervised=2210)   # one micro-batch
    mfu = flops_per_second / peak_flops(torch.cuda.get_device_name())

What is counted, per token a layer sees (P = in * out of one linear layer):
  frozen weight       2P forward + 2P for the input's gradient (a frozen weight gets no gradient)
  trainable weight    2P forward + 2P input gradient + 2P weight gradient = 6P
  LoRA                6 r (in + out) (A and B train)
  attention           causal scores and weighted sum, 4 n_head head_dim L(L+1)/2 per sequence of
                      length L forward, twice that backward (flash computes only the lower triangle)
  last block          o_proj and the MLP run on the supervised positions only (GPT.forward)
  output head         on the supervised positions only; the embedding lookup costs nothing
Real lengths, not the padded batch or block_size. Recomputation by activation checkpointing is not
model work and is not counted (it lowers MFU, as it should). The count is checked against torch's
FlopCounterMode in tests/test_precision.py.
"""

import torch.nn as nn

from nanocrs.lora import LoRALinear, SplitHead

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by device name, from the vendors' data sheets.
# First match wins: the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
]


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its torch.cuda.get_device_name(), or None if not in the table."""
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


def _linear_flops(m: nn.Module, tokens: int) -> float:
    """Forward + backward FLOPs of one (possibly LoRA-wrapped) linear layer over `tokens` tokens."""
    base = m.base if isinstance(m, LoRALinear) else m
    P = base.in_features * base.out_features
    trains = isinstance(base, nn.Linear) and base.weight.requires_grad  # a 4-bit base (NF4Linear) never does
    f = (6 if trains else 4) * P * tokens
    if isinstance(m, LoRALinear):
        f += 6 * m.rank * (base.in_features + base.out_features) * tokens
    return f


def train_flops(model, seq_lens: list[int], n_supervised: int, causal: bool = True) -> float:
    """FLOPs of forward + backward over sequences of these real lengths, n_supervised of whose
    positions carry a loss. causal=False counts the whole T x T score matrix (as an unfused math
    kernel computes it)."""
    cfg = model.config
    n_tok = sum(seq_lens)
    pairs = sum(L * (L + 1) // 2 if causal else L * L for L in seq_lens)
    total = 0.0
    for i, block in enumerate(model.layers):
        last = i == len(model.layers) - 1
        a = block.self_attn
        for m in (a.q_proj, a.k_proj, a.v_proj):
            total += _linear_flops(m, n_tok)
        rows = n_supervised if last else n_tok  # the last block's o_proj and MLP: supervised rows only
        for m in (a.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            total += _linear_flops(m, rows)
        total += 3 * 4 * cfg.n_head * cfg.head_dim * pairs  # scores and weighted sum, forward + 2x backward
    head = model.lm_head
    if isinstance(head, SplitHead):  # frozen old rows, trainable new rows
        D = head.base_rows.shape[1]
        for w in (head.base_rows, head.new_rows):
            total += (6 if w.requires_grad else 4) * D * w.shape[0] * n_supervised
    else:
        total += _linear_flops(head, n_supervised)
    return total
