"""
Item text encoders: item text -> one L2-normalised vector per item, the input of the quantizer.

The default needs no weights: TF-IDF over the words of the item text
("title: ... | year: ... | genres: ... | plot: ..."), reduced by a truncated SVD (latent semantic
analysis). Years also emit a decade word ("1987" -> "1980s") so that films of the same era share a
feature; titles are mostly unique words and so carry little weight after the reduction.

    from nanocrs.encoder import tfidf_svd
    emb = tfidf_svd(texts, dim=64)     # (N, 64) float32, rows of unit norm
"""

import re
from collections import Counter

import numpy as np

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
    # the SVD is exact and deterministic (LAPACK); the sign of each direction is fixed by making its
    # largest-magnitude entry positive, so the output does not depend on the library's choice
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    k = min(dim, len(S))
    E = U[:, :k] * S[:k]
    signs = np.sign(E[np.abs(E).argmax(axis=0), np.arange(k)])
    E *= np.where(signs == 0, 1, signs)
    E /= np.linalg.norm(E, axis=1, keepdims=True).clip(min=1e-12)
    return E.astype(np.float32)
