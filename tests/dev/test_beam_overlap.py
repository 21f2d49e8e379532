"""
dev/beam_overlap.py: a beam as wide as the catalogue is the exhaustive ranking, so against itself every
figure is 1; a narrow beam's figures are shares in [0, 1], its top-1 the exhaustive one on these turns.

    python -m pytest tests/dev/test_beam_overlap.py -q
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "dev")]
import beam_overlap  # noqa: E402
from nanocrs.data import load_dataset  # noqa: E402
from nanocrs.session import Session  # noqa: E402


def test_beam_overlap(trained_ckpt, dataset_dir):
    s = Session(trained_ckpt, "cpu")
    val = load_dataset(dataset_dir)["val"]
    wide = beam_overlap.overlap(s, val, 4, len(s.trie.item_ids), 256)
    assert wide["turns"] == 4 and wide["top1_agree"] == wide["top10_overlap"] == wide["top50_found"] == 1.0
    narrow = beam_overlap.overlap(s, val, 4, 5, 256)
    assert 0.0 <= narrow["top50_found"] <= 5 / 50 and 0.0 <= narrow["top10_overlap"] <= 0.5
