"""
The official ReDial and INSPIRED files, fetched over HTTPS, checked against pinned digests and cached
in ~/.cache/nanocrs (or --cache-dir / $NANOCRS_CACHE); $NANOCRS_DATA_URL replaces the URL base (the
tests point it at a local server). data_prep.py calls it when --raw is not given.

    raw = download("redial")          # the folder for nanocrs.datasets.build_redial
"""

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request

from nanocrs.common import atomic_path
from nanocrs.data import DataError


DEFAULT_URL_BASE = "https://raw.githubusercontent.com"
REDIAL_REPO = "ReDialData/website/849e9eb1bb60e312f8bf4daa82fc10a285e9318b"  # the initial commit, unzipped data
INSPIRED_REPO = "sweetpeach/Inspired/782d7c1845d11f75d2542809c7f2a51b63ef0304/data/dialog_data"
# (cache path, URL path, pinned digest). There is no internet where this was written, so the official
# files' sha256 could not be computed. Pins are therefore either
#   sha256:  of the copies in our data folder that are byte-identical to the official files (their git
#            blob id matches the one in the official repository), or
#   gitsha1: the official git blob id (sha1 of "blob <size>\0" + bytes) for files we have no copy of.
OFFICIAL = {
    "redial": [
        ("test_data.jsonl", f"{REDIAL_REPO}/test_data",
         "sha256:d7781750787d104ac005e829cc7e6277d25b14644a223b0c2445aaaded6b19ac"),
        ("train_data.jsonl", f"{REDIAL_REPO}/train_data", "gitsha1:bb882d7e398062df7b7e08e1261e05cf75f3268c"),
        ("movies_with_mentions.csv", f"{REDIAL_REPO}/movies_with_mentions.csv",
         "sha256:0d408daa474ac95b959a739a261dddd997dd800f5ea585da15a434a26187dbb0"),
        ("metadata/id2info.json", "RUCAIBox/iEvaLM-CRS/main/data/redial/id2info.json",  # built by iEvaLM-CRS
         "sha256:7bdfe9a9c7f1b4d59aa9a5aeba0029071fd5a7232b61c8257212a335ffe424f7"),
    ],
    "inspired": [
        ("train.tsv", f"{INSPIRED_REPO}/train.tsv", "gitsha1:e6044150da12d630d9cd5d40ca2ec36c498f20a6"),
        ("dev.tsv", f"{INSPIRED_REPO}/dev.tsv",
         "sha256:15a955be002222ba9e95f886802e06a91fb5e457f8a25deae3e7908d58faa947"),
        ("test.tsv", f"{INSPIRED_REPO}/test.tsv",
         "sha256:a10f63ff26045158460730d4829ffba74bee86fb744d9f48c1c1c511ef609993"),
        # for the title + year enrichment (build_inspired finds it as ../redial/metadata/id2info.json)
        ("../redial/metadata/id2info.json", "RUCAIBox/iEvaLM-CRS/main/data/redial/id2info.json",
         "sha256:7bdfe9a9c7f1b4d59aa9a5aeba0029071fd5a7232b61c8257212a335ffe424f7"),
    ],
}


def digest(path: str, kind: str) -> str:
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: str, pin: str) -> str:
    """Download url to dest unless a verified copy is cached; the pin ('sha256:...' or 'gitsha1:...') is
    checked before the file is moved into place, so the cache only ever holds verified files."""
    kind, want = pin.split(":")
    if os.path.isfile(dest) and digest(dest, kind) == want:
        return dest
    host = urllib.parse.urlparse(url).hostname
    if not url.startswith("https://") and host not in ("127.0.0.1", "localhost"):
        raise DataError(f"refusing to download {url}: only https (or a local test server) is allowed")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with atomic_path(dest, suffix=".part") as tmp:  # removed again if the download or the check fails
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"cannot download {url} ({reason}); offline? download the files yourself and pass --raw DIR") from None
        got = digest(tmp, kind)
        if got != want:
            raise DataError(f"{url}: {kind} mismatch (got {got}, pinned {want}); not cached, pass --raw DIR with files you trust")
    return dest


def download(dataset: str, cache_dir: str | None = None, url_base: str | None = None) -> str:
    """Fetch (or reuse from the cache) the official files of `dataset`; returns the folder for build_*."""
    if dataset not in OFFICIAL:
        raise DataError(f"--dataset {dataset} has no official download; pass --raw DIR")
    cache_dir = cache_dir or os.environ.get("NANOCRS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanocrs")
    url_base = (url_base or os.environ.get("NANOCRS_DATA_URL") or DEFAULT_URL_BASE).rstrip("/")
    root = os.path.join(cache_dir, dataset)
    for rel, url_path, pin in OFFICIAL[dataset]:
        dest = os.path.normpath(os.path.join(root, rel))
        print(f"  {dest}")
        fetch(f"{url_base}/{url_path}", dest, pin)
    return root
