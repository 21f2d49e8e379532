"""
Semantic-ID quantizers: item embeddings -> semantic IDs (SIDs) like <a_17><b_3><c_40><d_0>.

Two ways to get L codes per item (QuantizerConfig.method):
  - "rqkmeans" (default): residual k-means. Level 0 runs k-means on the embeddings, level l runs
    k-means on what is left after subtracting the chosen level-(l-1) codewords (the residuals).
  - "rqvae" (the paper, §1.3 / Table 7): an MLP autoencoder (in_dim->2048->...->64->32, mirrored
    decoder) whose 32-d latent is residual-quantized by L codebooks, initialised by residual k-means on
    the first batch's latents and trained with reconstruction + codebook + beta * commitment losses
    (straight-through estimator, AdamW). The codes are read from the trained latents.
Items that end up with the same L codes ("collisions") are made unique in one of two ways:
  - "suffix" (default): append one extra level holding the item's rank inside its collision group;
  - "reassign" (paper Appendix A / MQL4GRec): move the less confident items of a group to their next
    nearest free codeword, backtracking to earlier levels when a level runs out of free codes.
The result is a SemanticIDs table, an explicit bijection item id <-> code tuple, saved as JSON.

Usage:
    from nanocrs.quantizer import QuantizerConfig, quantize, SemanticIDs
    sids = quantize(emb, QuantizerConfig(levels=3, codebook_size=32), item_ids=ids)  # emb: (N, D) float32
    sids = quantize(emb, QuantizerConfig(method="rqvae", levels=4, codebook_size=64, collisions="reassign"))
    sids.tokens("m0042")   # ['<a_17>', '<b_3>', '<c_40>', '<d_0>']
    sids.save("data/NAME/sids.json"); sids = SemanticIDs.load("data/NAME/sids.json")

Everything runs on CPU in float32. The k-means assignment step uses chunked matmul distances so that
1M x 384 embeddings fit in a few GB (never an N x N or a full N x K float64 matrix), and each level's
centroids are fitted on at most 256 sampled points per centroid (QuantizerConfig.max_points_per_centroid),
so 1M items cost little more than 256 x K plus one assignment pass per level. The RQ-VAE is
meant for catalogues of thousands of items (the paper's 1.8k-7k), not millions, on CPU.
"""
import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocrs.common import atomic_path

CHUNK = 65536  # rows per distance chunk: CHUNK x K float32 stays small (64 MB at K=256)


@dataclass
class QuantizerConfig:
    levels: int = 3            # residual levels (RQ-KMeans and RQ-VAE alike)
    codebook_size: int = 32    # codes per level
    kmeans_iters: int = 50     # also used for the RQ-VAE codebook initialisation
    # RQ-KMeans fits each level's centroids on a random sample of at most this many points per
    # centroid, then assigns every item (FAISS's rule, same default): K centroids are pinned down long
    # before N = 1M points, and the Lloyd passes then cost O(K) instead of O(N). Catalogues below
    # 256 * K items (every dataset here) are fitted on all items, unchanged. 0 = always all items.
    max_points_per_centroid: int = 256
    seed: int = 0
    collisions: str = "suffix"  # "suffix" (default) or "reassign" (paper Appendix A)
    method: str = "rqkmeans"   # "rqkmeans" (residual k-means) or "rqvae" (the paper's RQ-VAE)
    # RQ-VAE (paper Table 7 = LC-Rec's settings: 7 linear layers in_dim->2048->...->64->32, lr 1e-3,
    # wd 1e-4, batch 1024, beta 0.25). LC-Rec trains 10,000 epochs on a GPU. On CPU we default to 300
    # (= 300 AdamW steps when N <= 1024): on the synthetic world that brings the reconstruction error
    # close to RQ-KMeans' with almost no collisions; it keeps improving after that, so raise it if
    # minutes per run are fine. On a busy shared CPU, OMP_NUM_THREADS=1 avoids threads thrashing.
    hidden: tuple = (2048, 1024, 512, 256, 128, 64)
    latent_dim: int = 32
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024
    beta: float = 0.25         # commitment weight: the encoder is pulled 4x less than the codebook


# -----------------------------------------------------------------------------
# k-means

def _assign(x, C, full=False):
    """Nearest centroid for every row of x, in chunks. Returns assign (N,), min sq. dist (N,), and
    when full=True the whole (N, K) squared-distance matrix."""
    N, K = x.shape[0], C.shape[0]
    c2 = (C * C).sum(1)                                           # (K,)
    assign = torch.empty(N, dtype=torch.int64)
    mind = torch.empty(N, dtype=torch.float32)
    dist = torch.empty(N, K, dtype=torch.float32) if full else None
    for s in range(0, N, CHUNK):
        xc = x[s:s + CHUNK]                                       # (B, D)
        # ||x||^2 - 2 x.c + ||c||^2 as one addmm: no (B, K, D) broadcast tensor
        d = torch.addmm(c2, xc, C.T, alpha=-2.0)                  # (B, K)
        d += (xc * xc).sum(1, keepdim=True)
        d.clamp_(min=0.0)                                         # rounding can go slightly negative
        m, a = d.min(1)
        assign[s:s + CHUNK], mind[s:s + CHUNK] = a, m
        if full:
            dist[s:s + CHUNK] = d
    return assign, mind, dist


def _kmeans_pp_init(x, k, g):
    """k-means++ (D^2 sampling) on a random subsample: a full pass over 1M rows per centroid would
    dominate the runtime, and a few thousand points per centroid is plenty to spread the seeds."""
    N = x.shape[0]
    n = min(N, max(4096, 64 * k))
    S = x[torch.randperm(N, generator=g)[:n]]                     # (n, D)
    s2 = (S * S).sum(1)                                           # (n,)
    # never seed at an exact zero (in residual k-means: an item alone in its cluster at the level
    # before). In high dimensions the origin is nearer to every point than the points are to each
    # other, so that seed takes them all and Lloyd stops there: one cluster and k-1 singletons.
    nonzero = s2 > 0
    if 0 < int(nonzero.sum()) < n:
        S, s2 = S[nonzero], s2[nonzero]
        n = S.shape[0]
    C = torch.empty(k, x.shape[1], dtype=torch.float32)

    def sqdist(c):  # (n,) squared distances to one centroid; a matvec, faster than (S - c)**2
        return (s2 - 2.0 * (S @ c) + c @ c).clamp_(min=0.0)

    C[0] = S[torch.randint(n, (1,), generator=g)]
    d2 = sqdist(C[0])                                             # (n,) distance to nearest chosen seed
    for j in range(1, k):
        total = d2.sum()
        if total > 0:
            i = torch.multinomial(d2 / total, 1, generator=g)
        else:  # fewer distinct points than k: any point will do, the code just stays unused/duplicate
            i = torch.randint(n, (1,), generator=g)
        C[j] = S[i]
        d2 = torch.minimum(d2, sqdist(C[j]))
    return C


def _update(x, assign, mind, k):
    """Lloyd update: mean of each cluster. Empty clusters get the points farthest from their own
    centroid (largest squared distance, ties by index), which is deterministic and splits big clusters."""
    D = x.shape[1]
    sums = torch.zeros(k, D, dtype=torch.float64)                 # float64: sums over ~1M rows
    for s in range(0, x.shape[0], CHUNK):
        part = torch.zeros(k, D)                                  # float32 index_add is much faster than
        part.index_add_(0, assign[s:s + CHUNK], x[s:s + CHUNK])   # float64, and exact enough per chunk
        sums += part.double()
    counts = torch.bincount(assign, minlength=k)                  # (k,)
    C = (sums / counts.clamp(min=1).unsqueeze(1)).float()         # (k, D)
    empty = (counts == 0).nonzero().squeeze(1)
    if len(empty) > 0:
        far = torch.argsort(mind, descending=True, stable=True)[:len(empty)]
        C[empty[:len(far)]] = x[far]
    return C


def kmeans(x, k, iters, seed):
    """k-means++ init + Lloyd iterations (stops early once no assignment changes).
    x: (N, D) array or tensor. Returns centroids (k, D) float32 and assign (N,) int64, as numpy."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    assert x.ndim == 2 and x.shape[0] >= 1 and k >= 1
    g = torch.Generator().manual_seed(seed)                       # local generator: no global seeding
    C = _kmeans_pp_init(x, k, g)
    assign, mind, _ = _assign(x, C)
    for _ in range(iters):
        C = _update(x, assign, mind, k)
        new_assign, mind, _ = _assign(x, C)
        changed = int((new_assign != assign).sum())
        assign = new_assign
        if changed == 0:
            break
    return C.numpy(), assign.numpy()


# -----------------------------------------------------------------------------
# residual k-means

def residual_kmeans(x, cfg, keep_distances=True):
    """Runs cfg.levels k-means levels on successive residuals; each level is fitted on a sample of at
    most cfg.max_points_per_centroid * K residuals (all of them when N is smaller), then assigns all N.
    Returns dict: codes (N, L) int64, codebooks [L x (K, D)], distances (N, L, K) float32 or None
    (skip it for big N: 1M x 3 x 256 floats is 3 GB), final_dist (N,) squared distance of each item's
    last-level residual to its codeword, mse [L] mean squared reconstruction error after each level."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    N, L, K = x.shape[0], cfg.levels, cfg.codebook_size
    r = x.clone()                                                 # (N, D) residual, updated in place
    codes = np.empty((N, L), dtype=np.int64)
    distances = np.empty((N, L, K), dtype=np.float32) if keep_distances else None
    codebooks, mse = [], []
    cap = cfg.max_points_per_centroid * K
    for l in range(L):
        seed = cfg.seed + 1000 * l                                # a different seed stream per level
        fit = r
        if cfg.max_points_per_centroid > 0 and N > cap:
            fit = r[torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1))[:cap]]  # (cap, D)
        C, _ = kmeans(fit, K, cfg.kmeans_iters, seed)
        C = torch.from_numpy(C)
        a, mind, dist = _assign(r, C, full=keep_distances)       # every item to the fitted centroids
        if keep_distances:
            distances[:, l] = dist.numpy()
        for s in range(0, N, CHUNK):                              # chunked: no second (N, D) temporary
            r[s:s + CHUNK] -= C[a[s:s + CHUNK]]
        codes[:, l] = a.numpy()
        codebooks.append(C.numpy())
        mse.append(float(mind.double().mean()))                  # = mean ||r^(l+1)||^2
    return dict(codes=codes, codebooks=codebooks, distances=distances,
                final_dist=mind.numpy(), mse=mse)


# -----------------------------------------------------------------------------
# RQ-VAE (paper §1.3): an MLP autoencoder whose latent is residual-quantized by L learned codebooks

class RQVAE(nn.Module):
    """in_dim -> hidden... -> latent_dim (ReLU between layers, none after the last), L codebooks of K
    latent vectors, and the mirrored decoder. Codebooks start as zeros and are set by init_codebooks."""

    def __init__(self, in_dim, cfg):
        super().__init__()
        dims = [in_dim, *cfg.hidden, cfg.latent_dim]

        def mlp(ds):
            layers = []
            for i in range(len(ds) - 1):
                layers.append(nn.Linear(ds[i], ds[i + 1]))
                if i < len(ds) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, cfg.latent_dim))  # (L, K, e)
        self.beta = cfg.beta
        for m in self.modules():
            if isinstance(m, nn.Linear):  # Xavier as LC-Rec: keeps the 7-layer ReLU stack's scale sane
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_codebooks(self, x, kmeans_iters, seed):
        """Residual k-means on the latents of x: training starts from RQ-KMeans in latent space, so no
        code starts dead and the first steps do not have to pull random codewords onto the data."""
        r = self.encoder(x)                                       # (B, e)
        for l in range(self.codebooks.shape[0]):
            C, a = kmeans(r, self.codebooks.shape[1], kmeans_iters, seed + 1000 * l)
            self.codebooks[l] = torch.from_numpy(C)
            r = r - self.codebooks[l][torch.from_numpy(a)]

    def quantize_latent(self, z):
        """z (B, e) -> codes (B, L), quantized z (B, e) with the straight-through gradient, and the
        quantization loss sum_l ||sg[r_l] - c_l||^2 + beta ||r_l - sg[c_l]||^2 (means over elements)."""
        r, q, codes, loss = z, torch.zeros_like(z), [], 0.0
        for l in range(self.codebooks.shape[0]):
            C = self.codebooks[l]                                 # (K, e)
            a, _, _ = _assign(r.detach(), C.detach())             # (B,) nearest codeword, no gradient
            c = C[a]                                              # (B, e)
            loss = loss + F.mse_loss(c, r.detach()) + self.beta * F.mse_loss(r, c.detach())
            # sg[c]: the next residual is z - sg(c_0 + ... + c_l), so later levels' commitment terms
            # pull the encoder toward the whole partial reconstruction, as in the RQ-VAE paper
            r = r - c.detach()
            q = q + c
            codes.append(a)
        z_q = z + (q - z).detach()                                # straight-through: d z_q / d z = I
        return torch.stack(codes, 1), z_q, loss

    def forward(self, x):
        z = self.encoder(x)                                       # (B, e)
        codes, z_q, qloss = self.quantize_latent(z)
        recon = self.decoder(z_q)                                 # (B, D)
        rloss = F.mse_loss(recon, x)
        return codes, rloss, qloss


def train_rqvae(x, cfg, verbose=False, keep_distances=True):
    """Trains an RQ-VAE on x (N, D) and returns the same dict as residual_kmeans, computed on the latent
    residuals: codes (N, L), codebooks [L x (K, e)], distances (N, L, K) or None, final_dist (N,),
    mse [L] mean ||latent residual||^2 after each level; plus losses (epochs + 1,) = the loss (recon +
    quantization) on all items before training, then each epoch's mean training loss, and recon_mse
    (before, after) on all items.
    Deterministic for cfg.seed; the global torch RNG is left untouched (fork_rng)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    N, L, K = x.shape[0], cfg.levels, cfg.codebook_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)                               # nn.Linear init draws from the global RNG
        g = torch.Generator().manual_seed(cfg.seed + 1)           # batch order
        model = RQVAE(x.shape[1], cfg)
        perm = torch.randperm(N, generator=g)
        model.init_codebooks(x[perm[:cfg.batch_size]], cfg.kmeans_iters, cfg.seed)  # the first batch
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def full_loss():  # (recon, recon + quantization) on all items
            with torch.no_grad():
                _, rl, ql = model(x)
            return float(rl), float(rl + ql)

        r0, l0 = full_loss()
        losses = [l0]
        for epoch in range(cfg.epochs):
            if epoch > 0:
                perm = torch.randperm(N, generator=g)
            total = 0.0
            for s in range(0, N, cfg.batch_size):
                idx = perm[s:s + cfg.batch_size]
                _, rl, ql = model(x[idx])
                opt.zero_grad(set_to_none=True)
                (rl + ql).backward()
                opt.step()
                total += (rl + ql).item() * len(idx)
            losses.append(total / N)  # training loss (before each step): no extra full pass per epoch
        r1, l1 = full_loss()
        if verbose:
            print(f"rqvae: {cfg.epochs} epochs, recon mse {r0:.4g} -> {r1:.4g}, "
                  f"recon + quantization loss {l0:.4g} -> {l1:.4g}")

        # final codes and distances from the trained encoder, exactly as the collision step needs them
        with torch.no_grad():
            r = model.encoder(x)                                  # (N, e) latent residual
            codes = np.empty((N, L), dtype=np.int64)
            distances = np.empty((N, L, K), dtype=np.float32) if keep_distances else None
            mse = []
            for l in range(L):
                C = model.codebooks[l].detach().clone()           # (K, e)
                a, mind, dist = _assign(r, C, full=keep_distances)
                if keep_distances:
                    distances[:, l] = dist.numpy()
                r = r - C[a]
                codes[:, l] = a.numpy()
                mse.append(float(mind.double().mean()))
            codebooks = [cb.numpy().copy() for cb in model.codebooks.detach()]
    return dict(codes=codes, codebooks=codebooks, distances=distances, final_dist=mind.numpy(),
                mse=mse, losses=np.array(losses), recon_mse=(r0, r1))


# -----------------------------------------------------------------------------
# collision handling

def add_collision_suffix(codes, dist):
    """Appends one level: the item's rank inside its group of identical L-codes (0 for unique items).
    Inside a group, items closer to their final-level codeword come first, ties by item index.
    dist: (N, L, K) distances or (N,) final-level distances. Returns (N, L+1) int64."""
    codes = np.asarray(codes, dtype=np.int64)
    N, L = codes.shape
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim == 3:
        dist = dist[np.arange(N), L - 1, codes[:, L - 1]]        # (N,) distance to own last codeword
    assert dist.shape == (N,)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)                                     # (N,) group id per item
    order = np.lexsort((np.arange(N), dist, group))               # sort by group, then dist, then index
    g_sorted = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g_sorted)) + 1]      # first position of each group
    first_pos = np.repeat(starts, np.diff(np.r_[starts, N]))
    suffix = np.empty(N, dtype=np.int64)
    suffix[order] = np.arange(N) - first_pos
    return np.concatenate([codes, suffix[:, None]], axis=1)


def reassign_collisions(codes, distances):
    """Paper Appendix A / MQL4GRec: inside each collision group the item with the smallest last-level
    distance keeps its code; the others, most confident first, take the nearest free last-level code;
    if none is free, the previous level is re-picked by distance rank (levels after it re-enumerated
    nearest first), and so on back to level 0. Returns unique codes (N, L); raises ValueError if the
    code space is too small. The stored distances are those of the original residuals: after a level
    is changed the true later residuals differ, but (as in MQL4GRec) the stored ranking is used."""
    codes = np.asarray(codes, dtype=np.int64).copy()
    distances = np.asarray(distances)
    N, L = codes.shape
    K = distances.shape[2]
    assert distances.shape[:2] == (N, L)
    if N > K ** L:
        raise ValueError(f"reassign_collisions: {N} items do not fit in {K}^{L} = {K ** L} codes; "
                         "use more levels/codes or collisions='suffix'")
    conf = distances[:, L - 1].min(1)                             # (N,) last-level confidence
    groups = {}
    for i in range(N):
        groups.setdefault(tuple(codes[i]), []).append(i)
    occupied = set(groups)                                        # keepers hold every current code
    movers = [i for members in groups.values() if len(members) > 1
              for i in sorted(members, key=lambda j: (conf[j], j))[1:]]
    movers.sort(key=lambda j: (conf[j], j))                       # most confident first, globally
    for i in movers:
        c = tuple(int(v) for v in codes[i])
        rank = np.argsort(distances[i], axis=1, kind="stable")    # (L, K) codes nearest first
        new = None
        for b in range(L - 1, -1, -1):                            # deepest level allowed to change
            # level b skips c[b]: every code with prefix c[:b+1] was already tried at b+1
            choices = [[v for v in rank[b].tolist() if v != c[b]]] + [rank[l].tolist() for l in range(b + 1, L)]
            for tail in itertools.product(*choices):
                if c[:b] + tail not in occupied:
                    new = c[:b] + tail
                    break
            if new is not None:
                break
        assert new is not None, "capacity was checked above, a free code must exist"
        occupied.add(new)
        codes[i] = new
    assert len({tuple(r) for r in codes.tolist()}) == N
    return codes


# -----------------------------------------------------------------------------
# the ID <-> item table

@dataclass
class SemanticIDs:
    item_ids: list
    codes: list
    level_sizes: list  # codes per level, suffix level included
    report: dict = field(default_factory=dict, repr=False, compare=False)  # quantize()'s figures; not saved
    _by_item: dict = field(init=False, repr=False)
    _by_codes: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.item_ids = [str(i) for i in self.item_ids]
        self.codes = [tuple(int(v) for v in c) for c in self.codes]
        self.level_sizes = [int(s) for s in self.level_sizes]
        L = len(self.level_sizes)
        if not 1 <= L <= 26 or min(self.level_sizes) < 1:
            raise ValueError(f"SemanticIDs: level_sizes must be 1..26 positive ints, got {self.level_sizes}")
        if len(self.item_ids) != len(self.codes):
            raise ValueError(f"SemanticIDs: {len(self.item_ids)} item_ids but {len(self.codes)} codes")
        for iid, c in zip(self.item_ids, self.codes):
            if len(c) != L or any(not 0 <= v < s for v, s in zip(c, self.level_sizes)):
                raise ValueError(f"SemanticIDs: item {iid!r} has codes {list(c)} outside level_sizes {self.level_sizes}")
        self._by_item = dict(zip(self.item_ids, self.codes))
        self._by_codes = dict(zip(self.codes, self.item_ids))
        if len(self._by_item) != len(self.item_ids):
            dup = next(i for i in self.item_ids if self.item_ids.count(i) > 1)
            raise ValueError(f"SemanticIDs: duplicate item id {dup!r}")
        if len(self._by_codes) != len(self.codes):
            seen = {}
            for iid, c in zip(self.item_ids, self.codes):
                if c in seen:
                    raise ValueError(f"SemanticIDs: items {seen[c]!r} and {iid!r} share codes {list(c)} (not a bijection)")
                seen[c] = iid
        assert len(self._by_item) == len(self._by_codes) == len(self)  # bijection

    def __len__(self):
        return len(self.item_ids)

    @staticmethod
    def token(level, code):
        return f"<{chr(ord('a') + level)}_{code}>"

    def tokens(self, item_id):
        return [self.token(l, v) for l, v in enumerate(self._by_item[item_id])]

    def item_of_codes(self, codes):
        return self._by_codes[tuple(int(v) for v in codes)]

    def item_of_tokens(self, tokens):
        """Inverse of tokens(): ['<a_17>', '<b_3>', ...] -> item id (KeyError if not a known SID)."""
        return self.item_of_codes(int(t[3:-1]) for t in tokens)

    def all_token_strings(self):
        return [self.token(l, v) for l, s in enumerate(self.level_sizes) for v in range(s)]

    def to_json(self):
        return {"level_sizes": list(self.level_sizes), "item_ids": list(self.item_ids),
                "codes": [list(c) for c in self.codes]}

    @classmethod
    def from_json(cls, d):
        if not isinstance(d, dict) or any(k not in d for k in ("level_sizes", "item_ids", "codes")):
            raise ValueError("SemanticIDs.from_json: need a dict with level_sizes, item_ids and codes")
        return cls(item_ids=d["item_ids"], codes=d["codes"], level_sizes=d["level_sizes"])

    def save(self, path):
        with atomic_path(path) as tmp, open(tmp, "w") as f:  # readers never see a half-written table
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"SemanticIDs.load: {path} is not valid JSON ({e})") from None
        return cls.from_json(d)


# -----------------------------------------------------------------------------
# everything together

def quantize(x, cfg, verbose=True, item_ids=None):
    """Embeddings (N, D) -> SemanticIDs. item_ids defaults to '0'..'N-1'. Prints a report if verbose."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"quantize: x must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("quantize: x contains NaN or inf")
    if cfg.levels < 1 or cfg.codebook_size < 1 or cfg.kmeans_iters < 0 or cfg.max_points_per_centroid < 0:
        raise ValueError(f"quantize: bad QuantizerConfig levels/codebook_size/kmeans_iters/max_points_per_centroid: {cfg}")
    if cfg.collisions not in ("suffix", "reassign"):
        raise ValueError(f"quantize: collisions must be 'suffix' or 'reassign', got {cfg.collisions!r}")
    if cfg.method not in ("rqkmeans", "rqvae"):
        raise ValueError(f"quantize: method must be 'rqkmeans' or 'rqvae', got {cfg.method!r}")
    if cfg.method == "rqvae" and (cfg.epochs < 0 or cfg.batch_size < 1 or cfg.latent_dim < 1 or cfg.lr <= 0
                                  or any(h < 1 for h in cfg.hidden)):
        raise ValueError(f"quantize: bad QuantizerConfig RQ-VAE settings (epochs/batch_size/latent_dim/lr/hidden): {cfg}")
    N, L, K = x.shape[0], cfg.levels, cfg.codebook_size
    if item_ids is None:
        item_ids = [str(i) for i in range(N)]
    if len(item_ids) != N:
        raise ValueError(f"quantize: {len(item_ids)} item_ids for {N} embeddings")

    keep = cfg.collisions == "reassign"
    if cfg.method == "rqkmeans":
        out = residual_kmeans(x, cfg, keep_distances=keep)
    else:
        out = train_rqvae(x, cfg, verbose=verbose, keep_distances=keep)
    codes = out["codes"]                                          # (N, L)
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    collided = float((counts[inv.reshape(-1)] > 1).mean())        # share of items sharing their L-code
    if cfg.collisions == "suffix":
        final = add_collision_suffix(codes, out["final_dist"])    # (N, L+1)
        level_sizes = [K] * L + [int(counts.max())]
    else:
        final = reassign_collisions(codes, out["distances"])      # (N, L)
        level_sizes = [K] * L
    sids = SemanticIDs(item_ids=list(item_ids), codes=final.tolist(), level_sizes=level_sizes)
    sids.report = dict(mse=list(out["mse"]), collided=collided, largest_group=int(counts.max()))

    if verbose:
        print(f"quantizer: {cfg.method}, {N} items, dim {x.shape[1]}, {L} levels x {K} codes, "
              f"collisions={cfg.collisions}")
        space = "latent residual" if cfg.method == "rqvae" else "residual"
        for l in range(L):
            p = np.bincount(codes[:, l], minlength=K) / N
            ppl = math.exp(-float((p[p > 0] * np.log(p[p > 0])).sum()))
            print(f"  level {l} ({chr(ord('a') + l)}): used {int((p > 0).sum())}/{K}, perplexity {ppl:.1f}, "
                  f"mean ||{space}||^2 after it {out['mse'][l]:.4g}")
        print(f"  collided before fix: {collided:.1%} of items ({N - len(counts)} beyond the first of their "
              f"group), largest group {int(counts.max())}")
        if cfg.collisions == "suffix":
            print(f"  largest suffix: {int(final[:, -1].max())}")
        else:
            print(f"  reassigned items: {int((final != codes).any(1).sum())}")
        print(f"  final ID length: {final.shape[1]} tokens, level sizes {level_sizes}")
    return sids
