"""
The correctness half of dev/bench.py --quick: nanocrs' trie-constrained beam search and transformers'
generate(num_beams=50, prefix_allowed_tokens_fn=...) on the same tiny random model and catalogue
return the same top-50 item lists, after the two models' logits were checked equal. No timing.

    python -m pytest tests/dev/test_bench.py -q        # a few seconds; skipped without transformers
"""

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dev"))
import bench  # noqa: E402


def test_beam_search_matches_transformers():
    w = bench.build_world(bench.QUICK)
    hf = bench.hf_twin(w.model)
    bench.assert_same_logits(w.model, hf, w.vocab.size)
    res = bench.compare_beams(w, hf, bench.make_prompts(w, 2, 24), width=50, rounds=0)
    assert res["identical"], res
    assert res["max_score_diff"] < 1e-3

