"""
The memory plan for LoRA and QLoRA fine-tuning an 8B backbone on one GPU, computed rather than guessed.

    python -m nanocrs.memplan                               # Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct
    python -m nanocrs.memplan --quantize nf4                # QLoRA only (default: both bases)
    python -m nanocrs.memplan --config path/to/config.json  # any supported Hugging Face config.json

The GPT is built on the meta device (shapes, no memory, no weights) from the real config.json via
config_from_hf, grown by nanocrs' new tokens exactly as backbone.prepare() does it, wrapped with
LoRA (r16 on q/k/v/o/gate/up/down) and given trainable new-token rows, and the parameters are then
counted, not derived. Memory = frozen weights (bf16) + trainable parameters with their gradients and
AdamW moments (all fp32) + activations of one micro-batch of B x 768 tokens (bf16), with and without
per-block activation checkpointing (train.py --grad-checkpoint). The activation formula is checked
against what autograd really saves in tests/test_memplan.py, over a 16-bit and over a 4-bit base.

QLoRA (--quantize nf4, nanocrs/nf4.py): the block linears are stored as 4-bit codes plus one fp32
scale per 64 weights (4.5 bits a weight); the embedding, the head's old rows, norms and biases stay
bf16. Activations are those of a 16-bit frozen base (the 4-bit matmul saves no input), plus one
transient: the matrix being dequantized, about 4 bytes a weight at its peak (the int32 index of
every byte and the bf16 result), for the largest matrix, one at a time. The last table gives the
largest micro-batch on 24, 40 and 80 GB cards for both bases.
"""

import argparse
import json
import math
import os

import torch

from nanocrs.hf import config_from_hf, resize_vocab
from nanocrs.lora import LoRALinear, apply_lora, train_new_token_rows
from nanocrs.model import GPT
from nanocrs.tokenizer import CONTROL_TOKENS, Tokenizer

# The two backbones' config.json, transcribed from the public model cards' config.json files
# (meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen2.5-7B-Instruct); only the fields that shape the model.
LLAMA_31_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "hidden_act": "silu",
    "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
    "attention_bias": False, "mlp_bias": False,
}
QWEN25_7B = {
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "hidden_act": "silu",
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "use_sliding_window": False,
}
# len(tokenizer.json), which config.json does not hold: prepare() trims the embedding to it before
# appending (Qwen pads its matrix to 152064 rows; its tokenizer has 151643 BPE + 22 special tokens).
MODELS = {"Llama-3.1-8B-Instruct": (LLAMA_31_8B, 128256), "Qwen2.5-7B-Instruct": (QWEN25_7B, 151665)}

N_NEW_TOKENS = 4 * 64 + len(CONTROL_TOKENS)  # the paper's 4 levels x 64 semantic-ID codes + control tokens
LORA_RANK, LORA_ALPHA = 16, 32.0
SEQ_LEN = 768                  # tokens per training sequence (the paper's block size)
BATCHES = (1, 4, 8, 16)        # micro-batch sizes in the table
PAPER_BATCH = 72               # the paper's batch size, reached by gradient accumulation
GPU_GIB, HEADROOM = 80, 0.10   # an 80 GB card; keep 10% for the CUDA context, allocator slack, transients
CARDS_GIB = (24, 40, 80)       # RTX 3090/4090, L4 and A10 (24; L4 and A10 expose a little less); A100 40/80, H100
GiB = 2 ** 30
BF16, FP32 = 2, 4
NF4_BLOCK = 64                 # weights per fp32 scale (nanocrs/nf4.py)
DEQUANT_BYTES = 4              # per weight of the matrix being dequantized: int32 index per 2 weights + bf16 out
LOGIT_FP32_COPIES = 3          # see head_bytes_per_token
TURN_SUPERVISED = 0.15         # share of tokens with a loss in the paper's turn format (ReDial 0.150, INSPIRED 0.097 here)


def build_meta(hf: dict, tokenizer_len: int, n_new: int = N_NEW_TOKENS, rank: int = LORA_RANK):
    """The fine-tuning model on the meta device: (model, first_new_id). No memory is touched."""
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        model = GPT(cfg)
        # backbone.prepare(): trim/grow to the tokenizer, then append the new tokens' rows.
        # resize_vocab is what add_tokens() calls; it runs on meta tensors (no tokenizer needed here)
        resize_vocab(model, tokenizer_len)
        first_new = tokenizer_len
        resize_vocab(model, tokenizer_len + n_new)
        if rank > 0:
            apply_lora(model, rank, LORA_ALPHA)
            train_new_token_rows(model, first_new)
    return model, first_new


def count_params(model) -> tuple[int, int]:
    """(frozen, trainable) parameter counts; a tied head is counted once."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable


def layer_bytes_per_token(cfg, rank: int, dropout: float, mask_bytes: int = 1) -> int:
    """Bytes autograd keeps per token for one Block in bf16 training with LoRA (frozen base weights).

    With D = n_embd, Dq = n_head*hd, Dkv = n_kv_head*hd, I = intermediate_size, H = n_head:
      2 RMSNorms     2 * (4D + 4)   the fp32 copy of the input (x.float(), saved by pow and mul) + rsqrt
      linear inputs  saved by LoRA's A (the frozen base needs only W for the input gradient):
                     no dropout:    2D (q,k,v share the normed x) + 2Dq (o) + 2D (gate,up) + 2I (down)
                     dropout p > 0: every wrapper draws its own mask, so each of the 7 keeps its
                                    dropped input (2 bytes) + mask (mask_bytes: 1 on CUDA, a bool)
                                    = 3*(2+m)D + (2+m)Dq + 2*(2+m)D + (2+m)I
      LoRA middle    7 * 2r         A's output (r wide), saved by B
      attention      2(Dq + 2Dkv) + 2Dq + 4H   flash SDPA keeps q, k, v (after RoPE), out and the
                                    fp32 logsumexp, never the T x T scores; RoPE keeps only cos/sin
      SwiGLU         3 * 2I         gate out, silu(gate), up out (their product is down's input, above)
    Without dropout: 12D + 6Dq + 4Dkv + 8I + 4H + 14r + 8.
    """
    D, I, H = cfg.n_embd, cfg.intermediate_size, cfg.n_head
    Dq, Dkv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    norms = 2 * (FP32 * D + FP32)
    if dropout > 0:
        d = BF16 + mask_bytes
        linear_inputs = 3 * d * D + d * Dq + 2 * d * D + d * I
    else:
        linear_inputs = BF16 * (D + Dq + D + I)
    lora_mid = 7 * BF16 * rank
    attention = BF16 * (Dq + 2 * Dkv) + BF16 * Dq + FP32 * H
    swiglu = 3 * BF16 * I
    return norms + linear_inputs + lora_mid + attention + swiglu


def head_bytes_per_token(cfg) -> int:
    """The final norm, the head's input and the logits, per token, counted as if every token had a
    loss. The loss runs on fp32 logits: at the start of backward the log-softmax output (saved), the
    gradient arriving from nll_loss and the gradient it returns are all (N, V) fp32. GPT.forward
    runs the head only on the N supervised tokens, so plan() also gives the figure with the paper's
    turn format, where only the last turn carries a loss; a chunked cross-entropy (head + loss over
    a few hundred tokens at a time, recomputed in backward) would make this term nearly vanish."""
    D, V = cfg.n_embd, cfg.vocab_size
    return FP32 * D + FP32 + BF16 * D + LOGIT_FP32_COPIES * FP32 * V


def nf4_bytes(numel: int) -> int:
    """Bytes of one matrix in NF4: two 4-bit codes a byte + an fp32 scale per block of 64."""
    n_blocks = math.ceil(numel / NF4_BLOCK)
    return n_blocks * NF4_BLOCK // 2 + FP32 * n_blocks


def weight_bytes(model, quantize: str) -> tuple[int, int]:
    """(frozen weight bytes, transient bytes of dequantizing) of a build_meta model: bf16, or with
    quantize="nf4" the LoRA-wrapped block linears in NF4 and the rest of the frozen weights bf16."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if quantize == "none":
        return BF16 * frozen, 0
    mats = [m.base.weight.numel() for m in model.modules() if isinstance(m, LoRALinear)]
    return BF16 * (frozen - sum(mats)) + sum(nf4_bytes(n) for n in mats), DEQUANT_BYTES * max(mats)


def plan(name: str, hf: dict, tokenizer_len: int, dropout: float, quantize: str = "none") -> dict:
    model, first_new = build_meta(hf, tokenizer_len)
    cfg = model.config
    frozen, trainable = count_params(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    layer = layer_bytes_per_token(cfg, LORA_RANK, dropout)
    head = head_bytes_per_token(cfg)
    logits = LOGIT_FP32_COPIES * FP32 * cfg.vocab_size  # the part of `head` a chunked loss removes
    weights, dequant = weight_bytes(model, quantize)
    static = weights + dequant + (FP32 + FP32 + 2 * FP32) * trainable  # weights + (param, grad, Adam m, v)
    per_token = {
        "no ckpt": cfg.n_layer * layer + head,
        # per-block checkpointing keeps each block's input (the bf16 residual stream) and rebuilds one
        # block's activations at a time in backward. (Logits and the recomputed block peak at
        # different moments; adding both overestimates slightly.)
        "ckpt": cfg.n_layer * BF16 * cfg.n_embd + layer + head,
        "ckpt + chunked CE": cfg.n_layer * BF16 * cfg.n_embd + layer + head - logits,
    }
    # the head on supervised tokens only (GPT.forward with targets), turn format
    per_token["ckpt, turn format"] = per_token["ckpt"] - round((1 - TURN_SUPERVISED) * logits)
    return dict(name=name, cfg=cfg, first_new=first_new, frozen=frozen, trainable=trainable, lora=lora,
                layer=layer, head=head, static=static, per_token=per_token, quantize=quantize,
                weights=weights, dequant=dequant)


def total_bytes(p: dict, mode: str, batch: int) -> int:
    return p["static"] + batch * SEQ_LEN * p["per_token"][mode]


def largest_batch(p: dict, mode: str, budget: float) -> int:
    return max(0, int((budget - p["static"]) // (SEQ_LEN * p["per_token"][mode])))


def card_budget(gib: float) -> float:
    return gib * GiB * (1 - HEADROOM)


def report(p: dict, dropout: float):
    cfg, budget = p["cfg"], GPU_GIB * GiB * (1 - HEADROOM)
    base = "QLoRA, NF4 base" if p["quantize"] == "nf4" else "LoRA, bf16 base"
    print(f"== {p['name']} ({base}): {cfg.n_layer} layers, d {cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head} heads, "
          f"mlp {cfg.intermediate_size}, vocab {cfg.vocab_size} (new ids >= {p['first_new']})")
    print(f"  params: frozen {p['frozen'] / 1e9:.3f} B, trainable {p['trainable'] / 1e6:.2f} M "
          f"(LoRA r{LORA_RANK} {p['lora'] / 1e6:.2f} M + new rows {(p['trainable'] - p['lora']) / 1e6:.2f} M)")
    if p["quantize"] == "nf4":
        print(f"  weights NF4 + bf16 embeddings {p['weights'] / GiB:.2f} GiB (+ {p['dequant'] / GiB:.2f} GiB dequantizing "
              f"the largest matrix); trainable fp32 + grads + AdamW m, v {16 * p['trainable'] / GiB:.2f} GiB")
    else:
        print(f"  weights bf16 {BF16 * p['frozen'] / GiB:.2f} GiB; trainable fp32 + grads + AdamW m, v "
              f"{16 * p['trainable'] / GiB:.2f} GiB")
    print(f"  activations: {p['layer']:,} bytes per token per layer (LoRA dropout {dropout}); "
          f"head + fp32 logits {p['head']:,} bytes per token")
    print(f"  {'micro-batch':>11} | {'no ckpt GiB':>11} {'fits':>4} | {'ckpt GiB':>8} {'fits':>4}")
    for b in BATCHES:
        cells = []
        for mode in ("no ckpt", "ckpt"):
            t = total_bytes(p, mode, b)
            cells.append(f"{t / GiB:{11 if mode == 'no ckpt' else 8}.1f} {'yes' if t <= budget else 'no':>4}")
        print(f"  {f'{b} x {SEQ_LEN}':>11} | {cells[0]} | {cells[1]}")
    for mode in ("no ckpt", "ckpt", "ckpt, turn format", "ckpt + chunked CE"):
        b = largest_batch(p, mode, budget)
        # the paper's batch by gradient accumulation: as few micro-batches as fit, of equal size if possible
        steps = math.ceil(PAPER_BATCH / b) if b else 0
        micro = "-" if not b else (f"{PAPER_BATCH // steps}" if PAPER_BATCH % steps == 0
                                   else f"<= {math.ceil(PAPER_BATCH / steps)}")
        print(f"  {mode:>17}: largest micro-batch {b:3d} ({total_bytes(p, mode, b) / GiB:.1f} GiB); "
              f"batch {PAPER_BATCH}: {steps} accumulation step{'s' if steps > 1 else ''} of {micro}")


def cards_table(plans: list[dict]):
    """The largest micro-batch of SEQ_LEN tokens per card size (budget: the card less HEADROOM)."""
    print(f"largest micro-batch of {SEQ_LEN} tokens, checkpointing on (turn format: head on "
          f"{TURN_SUPERVISED:.0%} of the tokens), budget = card - {HEADROOM:.0%}")
    print(f"  {'model':<24} {'base':<5} {'static GiB':>10} | " + " | ".join(f"{g} GB: ckpt / turn" for g in CARDS_GIB))
    for p in plans:
        cells = [f"{largest_batch(p, 'ckpt', card_budget(g)):>9} / {largest_batch(p, 'ckpt, turn format', card_budget(g)):<4}"
                 for g in CARDS_GIB]
        print(f"  {p['name']:<24} {'nf4' if p['quantize'] == 'nf4' else 'bf16':<5} {p['static'] / GiB:>10.2f} | "
              + " | ".join(f"{c:>17}" for c in cells))

def check_full_finetune(init_from: str, gpu_bytes: int, n_new: int = N_NEW_TOKENS):
    """Refuse (ValueError, before anything is loaded) a full fine-tune (--lora-rank 0) of a Hugging
    Face folder whose fp32 weights, gradients and AdamW moments (16 bytes a parameter, activations
    not counted) exceed the budget of a GPU with gpu_bytes of memory."""
    cfg_path = os.path.join(init_from, "config.json")
    if not os.path.isfile(cfg_path):
        return  # "smollm2" (135M parameters) or a folder load_hf will reject with its own message
    with open(cfg_path) as f:
        hf = json.load(f)
    model, _ = build_meta(hf, hf["vocab_size"], n_new, rank=0)
    need, budget = 4 * FP32 * model.num_params(), gpu_bytes * (1 - HEADROOM)
    if need > budget:
        raise ValueError(f"--lora-rank 0 fully fine-tunes {model.num_params() / 1e9:.1f}B parameters: fp32 weights, "
                         f"gradients and AdamW moments alone take {need / GiB:.0f} GiB, over this GPU's "
                         f"{budget / GiB:.0f} GiB budget; use LoRA (--lora-rank 16)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="GPU memory plan for LoRA fine-tuning a backbone (meta device only)")
    ap.add_argument("--config", help="a Hugging Face config.json (default: Llama-3.1-8B and Qwen2.5-7B)")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="train.py's default; 0 saves activations")
    ap.add_argument("--quantize", choices=["none", "nf4", "both"], default="both",
                    help="the frozen base: bf16 (LoRA), nf4 (QLoRA, train.py --quantize nf4) or both")
    a = ap.parse_args(argv)
    if a.config:
        if not os.path.isfile(a.config):
            raise ValueError(f"--config {a.config}: not found")
        with open(a.config) as f:
            hf = json.load(f)
        tok_path = os.path.join(os.path.dirname(a.config), "tokenizer.json")  # its length, if it is there
        tok_len = len(Tokenizer.load(tok_path)) if os.path.isfile(tok_path) else hf["vocab_size"]
        models = {a.config: (hf, tok_len)}
    else:
        models = MODELS
    print(f"LoRA r{LORA_RANK} on q/k/v/o/gate/up/down + {N_NEW_TOKENS} new token rows; sequences of "
          f"{SEQ_LEN} tokens; budget {GPU_GIB} GiB - {HEADROOM:.0%} = {GPU_GIB * (1 - HEADROOM):.0f} GiB")
    bases = ["none", "nf4"] if a.quantize == "both" else [a.quantize]
    plans = []
    for quantize in bases:
        for name, (hf, tok_len) in models.items():
            plans.append(plan(name, hf, tok_len, a.lora_dropout, quantize))
            report(plans[-1], a.lora_dropout)
    cards_table(plans)


if __name__ == "__main__":
    main()
