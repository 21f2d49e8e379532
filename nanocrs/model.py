"""
The model: a Llama-style decoder-only transformer, in one file.

    RMSNorm -> attention (grouped-query, split-halves RoPE, optional q/k/v bias and q/k RMSNorm)
            -> RMSNorm -> SwiGLU MLP, repeated n_layer times, then RMSNorm and the output head.

The same code runs the small from-scratch model of the quickstart and, filled from a Hugging Face
config.json, the Llama-3.x / Qwen2.5 / Qwen3 / Mistral families: every architectural switch those
families need (explicit head_dim, q/k/v biases, q/k norm, tied or untied embeddings, llama3 RoPE
scaling) is a field of GPTConfig. The semantic-ID and control tokens are ordinary rows at the end of
the vocabulary: nothing in this file knows about items. An optional module of heads (GPT(cfg, heads=...))
may take over the loss from the final hidden states; the plain model is the generative recommender.

Attention goes through F.scaled_dot_product_attention, which picks flash attention on CUDA and a
fused math kernel on the CPU. Decoding uses KVCache, a pre-allocated cache with an explicit write
position, which beam search expands (one prefill, many beams) and reorders.

    from nanocrs.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=3000))
    logits, _ = model(idx)                    # idx: (B, T) int64 -> logits (B, T, vocab)
    logits, h = model(idx, return_hidden=True)  # and the final hidden states (B, T, n_embd)
    _, loss = model(idx, targets)             # targets: (B, T) int64, -1 = no loss
"""

import math
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanocrs.nf4 import NF4Linear


@dataclass
class GPTConfig:
    vocab_size: int = 4096          # tokenizer length, added tokens included
    pad_vocab_to: int = 64          # embedding rows are rounded up to a multiple of this (speed); 1 = exact
    block_size: int = 256           # longest sequence the model is trained on (RoPE tables are this long)
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 4              # grouped-query attention: n_head must be a multiple of n_kv_head
    n_embd: int = 256
    head_dim: int = 0               # 0 = n_embd // n_head (Qwen3 sets it explicitly; never derive it there)
    intermediate_size: int = 0      # SwiGLU hidden size; 0 = about 8/3 n_embd rounded up to 64
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} or Llama-3.1's {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False          # Qwen2.5
    qk_norm: bool = False           # Qwen3: RMSNorm over each head's q and k before RoPE
    dropout: float = 0.0

    def __post_init__(self):
        if self.head_dim == 0:
            assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head (or set head_dim)"
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert self.head_dim % 2 == 0, "RoPE rotates pairs: head_dim must be even"

    @property
    def padded_vocab_size(self) -> int:
        return self.pad_vocab_to * math.ceil(self.vocab_size / self.pad_vocab_to)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config has unknown fields: {sorted(unknown)}")
        return cls(**d)


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 even under bf16 autocast: the mean of squares loses precision otherwise
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_frequencies(cfg: GPTConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's "llama3" scaling if the config asks for it."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "llama3":
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        inv_freq = scaled
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos, sin: (T, hd/2). Split-halves convention (Hugging Face's rotate_half):
    # element i is paired with element i + hd/2, so HF q_proj/k_proj weights load unchanged.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Pre-allocated keys and values for all layers: (n_layer, B, n_kv_head, max_len, head_dim).

    `pos` is how many slots are filled; GPT.forward writes the new block at [pos, pos + T) and
    advances it. Every row of the batch shares `pos` (beams of one context, or a batch of prompts).
    Prompts of different lengths are left-padded: `pad` (B,) says how many leading slots of each row
    hold no token. Those slots are never attended to, and a row's positions (RoPE) count from its
    first real token, so a padded row computes what it would alone.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 pad: torch.Tensor | None = None, prefix: "KVCache | None" = None):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        assert pad is None or pad.shape == (batch_size,), "pad: one count per row"
        self.pad = pad  # (B,) int64 or None (no padding)
        # Beams: a cache of only the tokens generated after a prefilled batch of prompts, `prefix`
        # (B rows). Its rows are the beams, K per prompt in prompt order (B*K rows, K may change
        # with each reorder); they attend to their prompt's slots in `prefix` without a copy of them.
        self.prefix = prefix
        if prefix is not None:
            assert batch_size == prefix.k.shape[1] and pad is None, "a beam cache starts with one row per prompt"
            self.pad = prefix.pad  # reordered with the rows, for the positions

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k, v):
        # k, v: (B, n_kv, T, hd) -> the whole filled cache of this layer (B, n_kv, pos + T, hd)
        T = k.shape[2]
        assert self.pos + T <= self.max_len, f"KV cache full ({self.pos} + {T} > {self.max_len})"
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def expand(self, n: int) -> "KVCache":
        """A batch-1 cache (one prefilled context) copied into n rows, one per beam."""
        assert self.k.shape[1] == 1, "expand() starts from a batch of one"
        new = KVCache.__new__(KVCache)
        new.k = self.k.expand(-1, n, -1, -1, -1).contiguous()
        new.v = self.v.expand(-1, n, -1, -1, -1).contiguous()
        new.pos = self.pos
        new.pad = None if self.pad is None else self.pad.expand(n).contiguous()
        new.prefix = None
        return new

    @property
    def offset(self) -> int:
        """Position of slot 0: the prompt's length for a beam cache, else 0."""
        return self.prefix.pos if self.prefix is not None else 0

    def reorder(self, rows: torch.Tensor):
        """Keep/duplicate batch rows (beam search survivors): rows (B',) indices into the batch."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)

    def attn_mask(self, T: int, S: int):
        """(B, 1, T, S) bool for a padded batch: the block's T queries at slots [S - T, S) see the keys
        causally, minus each row's padding. A padding slot's query sees only itself: a fully masked
        row would give NaN, and NaN values times a zero weight are still NaN in the next layer."""
        q = torch.arange(S - T, S, device=self.pad.device)[:, None]  # (T, 1) slots of the queries
        k = torch.arange(S, device=self.pad.device)[None, :]         # (1, S) slots of the keys
        return ((k <= q) & ((k >= self.pad[:, None, None]) | (k == q)))[:, None]  # (B, 1, T, S)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, rows=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, n_kv, start + T, hd)
        if cache is not None and cache.prefix is not None:
            y = self.prefix_attention(q, k, v, cache.prefix, layer)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))
        S = k.shape[2]
        if cache is not None and cache.pad is not None:
            mask, causal = cache.attn_mask(T, S), False  # a left-padded batch
        elif start == 0:
            mask, causal = None, True          # plain causal attention over the block
        elif T == 1:
            mask, causal = None, False         # one new token sees everything before it
        else:
            # a block appended to a filled cache: query i (at position start+i) sees keys <= start+i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        if rows is not None:  # only these positions' outputs are wanted (see Block)
            y = y.flatten(0, 1)[rows]                                    # (N, H*hd)
        return self.o_proj(y)

    def prefix_attention(self, q, k, v, prefix: KVCache, layer: int):
        """One new token per beam, attending to its prompt's slots in `prefix` and its own generated
        ones (k, v: (B*K, n_kv, S, hd), the new token last). The K beams of a prompt query the same
        prompt keys, so they are one batch of K*g query rows per prompt: the prompt is never copied
        per beam, and the product is a matrix product rather than K vector ones. The two parts share
        one softmax (their scores are concatenated). -> (B*K, H, 1, hd)"""
        BK, H, T, hd = q.shape
        assert T == 1, "beam rows decode one token at a time"
        B, n_kv = prefix.k.shape[1], self.n_kv_head
        K, g, L = BK // B, H // n_kv, prefix.pos
        kp, vp = prefix.k[layer, :, :, :L], prefix.v[layer, :, :, :L]  # (B, n_kv, L, hd)
        # query head h reads kv head h // g (grouped-query attention)
        qp = q.reshape(B, K, n_kv, g, hd).transpose(1, 2).reshape(B, n_kv, K * g, hd)
        s1 = (qp @ kp.transpose(-1, -2)).float() / math.sqrt(hd)                    # (B, n_kv, K*g, L)
        if prefix.pad is not None:  # the prompts' left padding
            s1 = s1.masked_fill(torch.arange(L, device=q.device) < prefix.pad[:, None, None, None], float("-inf"))
        s1 = s1.view(B, n_kv, K, g, L).transpose(1, 2).reshape(BK, n_kv, g, L)
        s2 = (q.reshape(BK, n_kv, g, hd) @ k.transpose(-1, -2)).float() / math.sqrt(hd)  # (B*K, n_kv, g, S)
        p = torch.softmax(torch.cat([s1, s2], -1), -1).to(v.dtype)                  # (B*K, n_kv, g, L+S)
        p1 = p[..., :L].reshape(B, K, n_kv, g, L).transpose(1, 2).reshape(B, n_kv, K * g, L)
        y1 = (p1 @ vp).view(B, n_kv, K, g, hd).transpose(1, 2).reshape(BK, n_kv, g, hd)
        y = y1 + p[..., L:] @ v                                                     # (B*K, n_kv, g, hd)
        return y.reshape(BK, H, 1, hd)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, rows=None):
        # rows (N,): the last block in training. Past the mixing of positions in attention, a position's
        # state feeds only its own output, so the output projection and the MLP are needed only at
        # the positions that carry a loss: x becomes (N, C).
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, rows)  # (B, T, C) or (N, C)
        x = x + a if rows is None else x.flatten(0, 1)[rows] + a
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    # Module names follow Hugging Face's LlamaForCausalLM minus the "model." prefix, so the
    # weight-name map for pretrained checkpoints is short and obvious.

    def __init__(self, cfg: GPTConfig, heads=None):
        """heads: None, or n_embd -> an nn.Module with loss(x, idx, targets, logits_fn, reduction), built
        here, after the output head, so that a seed gives the same weights whatever the heads are."""
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.heads = heads(cfg.n_embd) if heads is not None else None
        # RoPE tables are buffers, not weights: rebuilt from the config, never saved
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        # activation checkpointing: keep only each block's input, recompute the rest in backward
        # (about a third more compute for a fraction of the activation memory; for big backbones)
        self.grad_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2's trick: scale the residual-branch outputs so the stream's variance does not grow with depth
            for name, p in self.named_parameters():
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def add_heads(self, heads: nn.Module):
        """Give a model built elsewhere (a pretrained backbone) its heads; they train in fp32."""
        self.heads = heads.to(self.norm.weight.device)
        self.heads.apply(self._init_weights)

    def num_params(self) -> int:
        # tied weights are counted once; a 4-bit linear (nanocrs/nf4.py) holds its weights in buffers
        return (sum(p.numel() for p in self.parameters())
                + sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, NF4Linear)))

    def rope(self, start: int, T: int, device, pad: torch.Tensor | None = None):
        """cos, sin of positions start..start+T-1: (T, hd/2), or (B, 1, T, hd/2) with a left padding
        pad (B,), which shifts each row back so that its first real token is position 0."""
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)  # (T,)
        if pad is not None:
            pos = pos[None] - pad[:, None].float()  # (B, T); padding slots get negative ones (unused)
        freqs = pos[..., None] * self.inv_freq.to(device)  # (T, hd/2) or (B, T, hd/2)
        if pad is not None:
            freqs = freqs[:, None]  # (B, 1, T, hd/2): broadcast over the heads
        return freqs.cos(), freqs.sin()

    def forward(self, idx, targets=None, cache: KVCache | None = None, reduction: str = "mean",
                return_hidden: bool = False):
        """idx: (B, T) token ids. Without targets: (logits (B, T, vocab_size), None). With targets
        (B, T), -1 = no loss: (None, cross-entropy over the positions whose target is not -1, "mean"
        or "sum"). Work is then spent only where there is a loss: in dialog training most tokens are
        the user's and carry none. The output head runs on the supervised positions only (so no
        (B, T, vocab) logits tensor, for an 8B model with a 152k vocabulary the largest activation),
        and so do the last block's output projection and MLP: after the last attention, a position's
        state feeds nothing but its own output.
        With a cache, the block is placed at cache.pos and the cache advances by T. With heads, the loss
        is theirs (self.heads.loss), which reads every position's state. return_hidden (no targets):
        (logits, final hidden states (B, T, C))."""
        B, T = idx.shape
        start = cache.pos + cache.offset if cache is not None else 0
        cos, sin = self.rope(start, T, idx.device, cache.pad if cache is not None else None)
        rows = None  # (N,) flat indices of the positions with a loss; None = all B*T positions
        if targets is not None and self.heads is None and not torch.compiler.is_compiling():  # (a data-dependent shape
            rows = (targets.view(-1) != -1).nonzero().squeeze(1)          # would split a compiled graph)
            rows = None if len(rows) == B * T else rows                     # every position: no gather
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            last_rows = rows if i == len(self.layers) - 1 else None
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, i, last_rows, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, last_rows)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)  # (B, T, C), or (N, C) when the last block kept only the supervised rows
        if targets is None:
            logits = self.lm_head(x)[..., :self.config.vocab_size]  # drop the padding rows
            return logits, (x if return_hidden else None)
        if self.heads is not None:
            return None, self.heads.loss(x, idx, targets, lambda h: self.lm_head(h)[:, :self.config.vocab_size], reduction)
        t = targets.view(-1) if rows is None else targets.view(-1)[rows]  # (N,)
        logits = self.lm_head(x.view(-1, x.shape[-1]))[:, :self.config.vocab_size]  # (N, V)
        # fp32 softmax even under bf16 autocast
        return None, F.cross_entropy(logits.float(), t, ignore_index=-1, reduction=reduction)

    def new_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | None = None,
                  prefix: KVCache | None = None) -> KVCache:
        """An empty cache; pad (B,): left padding of each row; prefix: the prompts' cache that this
        one's rows (beams) continue (see KVCache). Its dtype is the one the keys are computed in: the
        autocast dtype when autocast is on (an fp32 cache would make SDPA mix dtypes or upcast, and
        rule out flash attention), else the backbone's. The norm's weight has the backbone's dtype and
        device (never split)."""
        p = self.norm.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype, pad=pad, prefix=prefix)

    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type="cpu", keep=()):
        # decay matrices (and the embedding), not norms, biases or the parameters in `keep`
        params = [p for p in self.parameters() if p.requires_grad]
        kept = {id(p) for p in keep}
        decay = [p for p in params if p.dim() >= 2 and id(p) not in kept]
        no_decay = [p for p in params if p.dim() < 2 or id(p) in kept]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # one fused kernel for all parameters instead of a loop over them (CUDA, and the CPU since
        # torch 2.4). transformers' Trainer defaults to the same optimizer.
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
