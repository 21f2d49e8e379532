"""
Shared pytest fixtures for the nanocrs test suite: a tiny prepared synthetic dataset and a tiny trained
checkpoint, both built once per session in a temporary folder (a few seconds on a laptop CPU).

    python -m pytest tests -q

The fixtures use absolute paths only, so the suite runs from any working directory.
"""

import os
import subprocess
import sys

import pytest
import torch

# Tiny models are latency-bound: one thread is fastest, and far faster than two threads on a busy
# machine, where thread contention slows small matmuls down badly.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# small enough to build in seconds, big enough for the synthetic world (it needs >= 8 items in some
# genre/decade cell, which 120 items do not reach with seed 0)
DATA_ARGS = ["--dataset", "synthetic", "--n-items", "160", "--n-train", "200", "--n-val", "30", "--n-test", "30",
             "--levels", "2", "--codebook-size", "8", "--vocab-size", "400", "--kmeans-iters", "20"]
TRAIN_ARGS = ["--max-steps", "6", "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2",
              "--batch-size", "8", "--eval-interval", "3", "--save-interval", "3", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """Path of a prepared tiny synthetic dataset folder (data_prep.py output)."""
    import data_prep
    out = str(tmp_path_factory.mktemp("data") / "syn")
    data_prep.main(DATA_ARGS + ["--out", out])
    for f in ("items.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "sids.json", "tokenizer.json", "dataset.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    return out


# the scripts as a user runs them: a subprocess, one thread, the repository importable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": REPO}


def run_cli(script, *args, stdin=None, timeout=180, env=None):
    """python REPO/script args... -> the CompletedProcess (text stdout and stderr)."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env or ENV,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def run_train(data_dir: str, out_dir: str, extra=()):
    import train
    train.main(TRAIN_ARGS + ["--data", data_dir, "--out", out_dir] + list(extra))
    return out_dir


@pytest.fixture(scope="session")
def trained_ckpt(dataset_dir, tmp_path_factory):
    """Path of a checkpoint folder trained for 6 steps (saved at steps 3 and 6)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "A")
    return run_train(dataset_dir, out)


@pytest.fixture(scope="session")
def tok(dataset_dir):
    from nanocrs.tokenizer import Tokenizer
    return Tokenizer.load(os.path.join(dataset_dir, "tokenizer.json"))


@pytest.fixture(scope="session")
def sids(dataset_dir):
    from nanocrs.quantizer import SemanticIDs
    return SemanticIDs.load(os.path.join(dataset_dir, "sids.json"))


@pytest.fixture(scope="session")
def dataset(dataset_dir):
    from nanocrs.data import load_dataset
    return load_dataset(dataset_dir)
