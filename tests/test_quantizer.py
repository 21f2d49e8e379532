"""
Tests for nanocrs/quantizer.py (residual k-means and RQ-VAE semantic IDs + collision handling).
Run: . /work/venv/bin/activate && cd /work/main && python -m pytest -q tests/test_quantizer.py
"""
import itertools
import json

import numpy as np
import pytest
import torch

from nanocrs.quantizer import (QuantizerConfig, SemanticIDs, add_collision_suffix, kmeans, quantize,
                               reassign_collisions, residual_kmeans, train_rqvae)


def blobs(n_per=50, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 20.0
    x = np.concatenate([c + 0.1 * rng.standard_normal((n_per, d)) for c in centers]).astype(np.float32)
    labels = np.repeat(np.arange(k), n_per)
    return x, labels, centers


def duplicated(n_distinct=60, copies=5, d=16, seed=0):
    """Many exact duplicates: every item collides with copies-1 others whatever the codebook."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_distinct, d)).astype(np.float32)
    return np.repeat(base, copies, axis=0)


def test_kmeans_recovers_blobs():
    x, labels, centers = blobs()
    C, a = kmeans(x, 4, iters=20, seed=0)
    assert C.shape == (4, 8) and a.shape == (200,) and a.dtype == np.int64
    # each true blob maps to exactly one cluster and the clusters are all different
    mapping = {int(l): set(a[labels == l].tolist()) for l in range(4)}
    assert all(len(s) == 1 for s in mapping.values())
    assert len({next(iter(s)) for s in mapping.values()}) == 4
    for l in range(4):
        assert np.linalg.norm(C[next(iter(mapping[l]))] - centers[l]) < 0.5


def test_kmeans_more_clusters_than_distinct_points():
    x = duplicated(n_distinct=3, copies=10, d=4)
    C, a = kmeans(x, 8, iters=5, seed=1)  # must not crash; empty clusters get re-seeded
    assert C.shape == (8, 4) and np.isfinite(C).all() and a.max() < 8


def test_determinism_and_no_global_rng_side_effects():
    x = np.random.default_rng(3).standard_normal((300, 32)).astype(np.float32)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    cfg = QuantizerConfig(levels=3, codebook_size=8, kmeans_iters=10, seed=7)
    a = quantize(x, cfg, verbose=False)
    b = quantize(x, cfg, verbose=False)
    assert a.codes == b.codes and a.level_sizes == b.level_sizes
    assert (np.random.get_state()[1] == np_state).all()
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("mode", ["suffix", "reassign"])
def test_unique_sids_with_many_collisions(mode):
    x = duplicated()
    ids = [f"m{i:04d}" for i in range(len(x))]
    s = quantize(x, QuantizerConfig(levels=3, codebook_size=8, kmeans_iters=10, collisions=mode),
                 verbose=False, item_ids=ids)
    assert len(s) == len(x) == len(set(s.codes))
    assert all(s.item_of_tokens(s.tokens(i)) == i for i in ids)
    for c in s.codes:
        assert all(0 <= v < n for v, n in zip(c, s.level_sizes))
    if mode == "suffix":
        assert len(s.level_sizes) == 4 and s.level_sizes[-1] >= 5  # groups of >= 5 identical vectors
    else:
        assert s.level_sizes == [8, 8, 8]


def test_quantize_report_and_token_format(capsys):
    x = np.random.default_rng(0).standard_normal((600, 64)).astype(np.float32)
    s = quantize(x, QuantizerConfig())
    out = capsys.readouterr().out
    assert "perplexity" in out and "collided" in out and "final ID length: 4" in out
    toks = s.tokens("5")
    assert len(toks) == 4 and [t[:3] for t in toks] == ["<a_", "<b_", "<c_", "<d_"]
    assert s.item_of_tokens(toks) == "5"
    allt = s.all_token_strings()
    assert len(allt) == len(set(allt)) == sum(s.level_sizes)
    assert allt[0] == "<a_0>" and allt[32] == "<b_0>" and set(toks) <= set(allt)


def test_json_roundtrip(tmp_path):
    x = duplicated(n_distinct=40, copies=3)
    s = quantize(x, QuantizerConfig(levels=2, codebook_size=8, kmeans_iters=5), verbose=False,
                 item_ids=[f"i{i}" for i in range(len(x))])
    t = SemanticIDs.from_json(json.loads(json.dumps(s.to_json())))
    assert all(t.tokens(i) == s.tokens(i) for i in s.item_ids)
    path = tmp_path / "sids.json"
    s.save(path)
    assert not (tmp_path / "sids.json.tmp").exists()
    u = SemanticIDs.load(path)
    assert u.item_ids == s.item_ids and u.codes == s.codes and u.level_sizes == s.level_sizes


@pytest.mark.parametrize("bad, msg", [
    (dict(item_ids=["a", "b"], codes=[[0, 1], [0, 1]], level_sizes=[2, 2]), "share codes"),
    (dict(item_ids=["a", "a"], codes=[[0, 1], [1, 1]], level_sizes=[2, 2]), "duplicate item id"),
    (dict(item_ids=["a", "b"], codes=[[0, 1]], level_sizes=[2, 2]), "2 item_ids but 1 codes"),
    (dict(item_ids=["a", "b"], codes=[[0, 1], [2, 0]], level_sizes=[2, 2]), "outside level_sizes"),
    (dict(item_ids=["a"], codes=[[0]], level_sizes=[2, 2]), "outside level_sizes"),
    (dict(item_ids=["a"], codes=[[0]]), "need a dict"),
])
def test_from_json_rejects_bad_tables(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SemanticIDs.from_json(bad)


def test_suffix_ranks():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    dist = np.array([0.5, 0.1, 0.2, 9.0, 0.2, 0.0])  # group [1,2]: items 2 and 4 tie -> index order
    out = add_collision_suffix(codes, dist)
    assert out.shape == (6, 3) and (out[:, :2] == codes).all()
    assert out[:, 2].tolist() == [2, 1, 0, 0, 1, 0]
    assert out[3, 2] == 0  # the unique item gets suffix 0
    # (N, L, K) distances give the same answer as the (N,) final-level distances
    D = np.zeros((6, 2, 4), dtype=np.float32)
    D[np.arange(6), 1, codes[:, 1]] = dist
    assert (add_collision_suffix(codes, D) == out).all()


def test_reassign_basic_and_non_colliding_unchanged():
    rng = np.random.default_rng(0)
    N, L, K = 50, 3, 4
    codes = rng.integers(0, K, (N, L))
    codes[10] = codes[11] = codes[12] = codes[0]  # force collisions
    D = rng.random((N, L, K)).astype(np.float32)
    new = reassign_collisions(codes, D)
    assert new.shape == (N, L) and new.min() >= 0 and new.max() < K
    assert len({tuple(r) for r in new.tolist()}) == N
    _, inv, cnt = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    unique_items = cnt[inv.reshape(-1)] == 1
    assert (new[unique_items] == codes[unique_items]).all()
    # in each collision group the item with the smallest last-level distance keeps its code
    for g in np.flatnonzero(cnt > 1):
        members = np.flatnonzero(inv.reshape(-1) == g)
        keeper = min(members, key=lambda i: (D[i, L - 1].min(), i))
        assert (new[keeper] == codes[keeper]).all()


def test_reassign_backtracks_to_earlier_levels():
    # 3 items on code (0, 0) with K=2: the last level only offers (0, 1), so one item must change level 0
    codes = np.zeros((3, 2), dtype=np.int64)
    D = np.tile(np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32), (3, 1, 1))
    D[:, 1, 0] += np.array([0.0, 0.1, 0.2])  # item 0 is the most confident -> keeps (0, 0)
    new = reassign_collisions(codes, D)
    assert new.tolist() == [[0, 0], [0, 1], [1, 0]]
    # full code space: 4 items in 2^2 codes still fit, 5 do not
    assert len({tuple(r) for r in reassign_collisions(np.zeros((4, 2), int), np.zeros((4, 2, 2))).tolist()}) == 4
    with pytest.raises(ValueError, match="do not fit"):
        reassign_collisions(np.zeros((5, 2), int), np.zeros((5, 2, 2)))


def test_reassign_matches_brute_force_order():
    """The first free code in (backtrack level, distance rank) order, checked by brute force."""
    rng = np.random.default_rng(1)
    L, K = 3, 3
    codes = np.array([[0, 0, 0]] * 3 + [[0, 0, k] for k in (1, 2)] + [[0, 1, 0]])  # (6, 3)
    D = rng.random((6, L, K)).astype(np.float32)
    D[np.arange(6)[:, None], np.arange(L), codes] = -1.0  # own codes are nearest, as after k-means
    new = reassign_collisions(codes, D)
    taken = {tuple(r) for r in codes.tolist()}
    movers = sorted([0, 1, 2], key=lambda i: (D[i, 2].min(), i))[1:]
    for i in movers:
        rank = [list(np.argsort(D[i, l], kind="stable")) for l in range(L)]
        expect = None
        for b in range(L - 1, -1, -1):
            for tail in itertools.product(*[[v for v in rank[b] if v != codes[i, b]]] + rank[b + 1:]):
                cand = tuple(codes[i, :b]) + tuple(tail)
                if cand not in taken:
                    expect = cand
                    break
            if expect:
                break
        assert tuple(new[i]) == expect
        taken.add(expect)


def test_residual_error_decreases_per_level():
    x = np.random.default_rng(0).standard_normal((500, 32)).astype(np.float32)
    out = residual_kmeans(x, QuantizerConfig(levels=4, codebook_size=16, kmeans_iters=20))
    mse = [float((x ** 2).sum(1).mean())] + out["mse"]
    assert all(a > b for a, b in zip(mse, mse[1:]))
    assert out["codes"].shape == (500, 4) and out["distances"].shape == (500, 4, 16)
    # reconstruction from the codebooks matches the reported final error
    recon = sum(cb[out["codes"][:, l]] for l, cb in enumerate(out["codebooks"]))
    assert np.allclose(((x - recon) ** 2).sum(1), out["final_dist"], rtol=1e-3, atol=1e-3)
    # the stored distances are consistent with the chosen codes (k-means picks the nearest codeword)
    assert (out["distances"].argmin(2) == out["codes"]).mean() > 0.99


def test_sampled_fit_is_close_to_the_full_fit_and_a_no_op_for_small_catalogues():
    x = np.random.default_rng(1).standard_normal((20000, 16)).astype(np.float32)
    full = residual_kmeans(x, QuantizerConfig(levels=2, codebook_size=8, max_points_per_centroid=0), False)
    # the default 256 points per centroid -> each level is fitted on 2,048 of the 20,000 residuals
    samp = residual_kmeans(x, QuantizerConfig(levels=2, codebook_size=8), False)
    again = residual_kmeans(x, QuantizerConfig(levels=2, codebook_size=8), False)
    assert np.array_equal(samp["codes"], again["codes"])              # seeded sample: deterministic
    assert not np.array_equal(samp["codes"], full["codes"])           # a different fit, ...
    for a, b in zip(samp["mse"], full["mse"]):                        # ... but nearly as good,
        assert b <= a * 1.001 and a < b * 1.03, (samp["mse"], full["mse"])
    # every item is still assigned to its nearest fitted centroid
    recon = sum(cb[samp["codes"][:, l]] for l, cb in enumerate(samp["codebooks"]))
    assert np.allclose(((x - recon) ** 2).sum(1), samp["final_dist"], rtol=1e-3, atol=1e-3)
    # a catalogue within the cap (N <= 2,500 * 8) is fitted on everything: identical to no cap
    small = residual_kmeans(x, QuantizerConfig(levels=2, codebook_size=8, max_points_per_centroid=2500), False)
    assert np.array_equal(small["codes"], full["codes"])


def test_kmeans_never_seeds_at_an_exact_zero():
    # Exact zeros are what residual k-means hands the next level for items alone in their cluster. A
    # seed at the origin is nearer to every point of a high-dimensional cloud than the points are to
    # each other: it took 2,084 of these 2,100 points (seed 6) before seeds skipped exact zeros.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((2000, 64)).astype(np.float32), np.zeros((100, 64), np.float32)])
    for seed in range(8):
        C, a = kmeans(x, 16, 50, seed)
        assert np.bincount(a, minlength=16).max() < 400, seed        # 2100 / 16 = 131 on average
    # all-zero data still works (every seed is then a zero)
    C, a = kmeans(np.zeros((20, 4), np.float32), 3, 5, 0)
    assert (C == 0).all() and a.shape == (20,)


def test_bad_inputs():
    with pytest.raises(ValueError, match="collisions"):
        quantize(np.zeros((10, 4), np.float32), QuantizerConfig(collisions="nope"), verbose=False)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        quantize(np.zeros(10, np.float32), QuantizerConfig(), verbose=False)
    with pytest.raises(ValueError, match="item_ids"):
        quantize(np.zeros((10, 4), np.float32), QuantizerConfig(codebook_size=2), verbose=False, item_ids=["a"])


# -----------------------------------------------------------------------------
# RQ-VAE: a small MLP so the tests take seconds; the paper-sized default is exercised by data_prep.py

def small_vae(**kw):
    base = dict(method="rqvae", levels=3, codebook_size=8, hidden=(64, 32), latent_dim=8, epochs=60,
                kmeans_iters=10)
    return QuantizerConfig(**{**base, **kw})


def test_rqvae_trains_and_outputs_are_consistent():
    x, _, _ = blobs(n_per=50, k=4, d=16)
    x /= np.abs(x).max()                                          # the MLP likes O(1) inputs
    cfg = small_vae()
    out = train_rqvae(x, cfg)
    L, K, N = cfg.levels, cfg.codebook_size, len(x)
    assert out["losses"].shape == (cfg.epochs + 1,)
    assert out["losses"][-1] < 0.7 * out["losses"][0]             # it learns
    assert out["recon_mse"][1] < out["recon_mse"][0]
    assert out["codes"].shape == (N, L) and out["codes"].min() >= 0 and out["codes"].max() < K
    assert out["distances"].shape == (N, L, K) and len(out["codebooks"]) == L
    assert out["codebooks"][0].shape == (K, cfg.latent_dim)
    # codes are the nearest codewords of the latent residuals, and final_dist is the last level's distance
    assert (out["distances"].argmin(2) == out["codes"]).mean() > 0.99
    last = out["distances"][np.arange(N), L - 1, out["codes"][:, L - 1]]
    assert np.allclose(last, out["final_dist"], rtol=1e-4, atol=1e-6)
    # the 4 well separated blobs land on different level-0 codes
    assert len({int(c) for c in out["codes"][::50, 0]}) == 4


def test_rqvae_deterministic_and_no_global_rng_side_effects():
    x = np.random.default_rng(3).standard_normal((120, 16)).astype(np.float32)
    torch_state = torch.get_rng_state().clone()
    a = train_rqvae(x, small_vae(seed=5, epochs=20))
    b = train_rqvae(x, small_vae(seed=5, epochs=20))
    assert (a["codes"] == b["codes"]).all() and np.array_equal(a["losses"], b["losses"])
    assert torch.equal(torch.get_rng_state(), torch_state)
    c = train_rqvae(x, small_vae(seed=6, epochs=20))
    assert not np.array_equal(a["losses"], c["losses"])           # the seed matters


@pytest.mark.parametrize("mode", ["suffix", "reassign"])
def test_rqvae_unique_sids(mode):
    x = duplicated(n_distinct=40, copies=4)                       # 160 items, groups of 4 identical ones
    s = quantize(x, small_vae(collisions=mode, epochs=20), verbose=False)
    assert len(s) == len(x) == len(set(s.codes))
    for c in s.codes:
        assert all(0 <= v < n for v, n in zip(c, s.level_sizes))
    assert s.level_sizes == ([8, 8, 8, s.level_sizes[-1]] if mode == "suffix" else [8, 8, 8])
    if mode == "suffix":
        assert s.level_sizes[-1] >= 4


def test_quantize_rqvae_end_to_end(capsys):
    x = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)                 # unit rows, like the encoders give
    s = quantize(x, QuantizerConfig(method="rqvae", levels=3, codebook_size=16, hidden=(128, 64),
                                    epochs=100, collisions="reassign"), item_ids=[f"m{i}" for i in range(200)])
    out = capsys.readouterr().out
    assert "rqvae" in out and "recon mse" in out and "used" in out and "final ID length: 3" in out
    assert len(set(s.codes)) == 200 and s.level_sizes == [16, 16, 16]
    assert s.item_of_tokens(s.tokens("m7")) == "m7"


def test_rqvae_bad_inputs():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="method"):
        quantize(x, QuantizerConfig(method="vqvae"), verbose=False)
    with pytest.raises(ValueError, match="RQ-VAE"):
        quantize(x, QuantizerConfig(method="rqvae", epochs=-1), verbose=False)
