"""
Tests for nanocrs/metrics.py: ranking metrics on hand-computed ranks, the co-occurrence and
repeat+co-occurrence baselines on a tiny hand-made dialog set, BLEU parity with the sacrebleu package
(skipped when it is not installed: it is a dev dependency), Distinct-n, replace_spans, perplexity.

    python -m pytest tests/test_metrics.py -q
"""

import math

import pytest

from nanocrs.metrics import (CoOccurrence, Popularity, corpus_bleu, distinct_per_sentence, distinct_ratio,
                             perplexity, rank_metrics, rank_of, repeat_context, repeat_then, replace_spans,
                             tokenize_13a)

# ----------------------------------------------------------------------------- ranking metrics


def test_rank_of_missing_and_short_lists():
    assert rank_of(["a", "b", "c"], "a") == 1
    assert rank_of(["a", "b", "c"], "c") == 3
    assert rank_of(["a", "b"], "z") == 0
    assert rank_of([], "z") == 0


def test_rank_metrics_hand_computed():
    # gold at rank 1, at rank 3 of a 3-item list (shorter than every k), missing, and at rank 12
    ranks = [rank_of(["g"], "g"), rank_of(["x", "y", "g"], "g"), rank_of(["x", "y"], "g"), 12]
    assert ranks == [1, 3, 0, 12]
    m = rank_metrics(ranks)
    expected = {
        "recall@1": 1 / 4, "recall@5": 2 / 4, "recall@10": 2 / 4, "recall@20": 3 / 4, "recall@50": 3 / 4,
        "ndcg@5": (1 + 1 / 2) / 4, "ndcg@10": (1 + 1 / 2) / 4, "ndcg@20": (1 + 1 / 2 + 1 / math.log2(13)) / 4,
        "mrr@5": (1 + 1 / 3) / 4, "mrr@10": (1 + 1 / 3) / 4, "mrr@20": (1 + 1 / 3 + 1 / 12) / 4,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_rank_metrics_no_samples_is_zero():
    assert all(v == 0 for v in rank_metrics([]).values())


# ----------------------------------------------------------------------------- baselines

def turn(role, *items):
    return {"role": role, "text": " ".join(f"@{{{i}}}" for i in items), "items": list(items)}


# recommender mentions: B x4 (repeated in d2), C x1, E x1  -> popularity B, C, E, then A, D, F by id
# dialogs' item sets: {A,B,C} {A,B} {B,D} {E}              -> cooc A-B 2, A-C 1, B-C 1, B-D 1
TRAIN = [
    {"id": "d1", "turns": [turn("user", "A"), turn("assistant", "B"), turn("user"), turn("assistant", "C")]},
    {"id": "d2", "turns": [turn("user", "A"), turn("assistant", "B"), turn("assistant", "B")]},
    {"id": "d3", "turns": [turn("user", "D"), turn("assistant", "B")]},
    {"id": "d4", "turns": [turn("assistant", "E"), turn("user", "E")]},
]
CATALOGUE = ["A", "B", "C", "D", "E", "F"]


def test_popularity_order():
    assert Popularity(TRAIN, CATALOGUE).rank([]) == ["B", "C", "E", "A", "D", "F"]


def test_cooccurrence_counts_pairs_once_per_dialog():
    co = CoOccurrence(TRAIN, CATALOGUE)
    assert co.cooc["A"] == {"B": 2, "C": 1}
    assert co.cooc["B"] == {"A": 2, "C": 1, "D": 1}
    assert "E" not in co.cooc  # alone in its dialog; repeating it does not pair it with itself


def test_cooccurrence_rankings():
    co = CoOccurrence(TRAIN, CATALOGUE)
    # no items in the context -> exactly the popularity list
    assert co.rank([turn("user")]) == ["B", "C", "E", "A", "D", "F"]
    # A: B=2, C=1; the context item A itself is not excluded, it follows in popularity order
    assert co.rank([turn("user", "A")]) == ["B", "C", "E", "A", "D", "F"]
    # C: A=1, B=1 tie -> broken by popularity (B), not by id (A)
    assert co.rank([turn("user", "C")]) == ["B", "A", "C", "E", "D", "F"]
    # scores are summed over context items (mentioned twice still counts once): C,D -> B=2, A=1
    assert co.rank([turn("user", "C"), turn("assistant", "D"), turn("user", "C")]) == ["B", "A", "C", "E", "D", "F"]
    # B: A=2, then C=1 and D=1 tie -> C (more popular) first
    assert co.rank([turn("user", "B")]) == ["A", "C", "D", "B", "E", "F"]
    # an item unseen in training scores nothing -> popularity, ties by id
    assert co.rank([turn("user", "F")]) == ["B", "C", "E", "A", "D", "F"]
    assert co.rank([turn("user", "A")], k=2) == ["B", "C"]


def test_repeat_then_cooccurrence_or_popularity():
    co = CoOccurrence(TRAIN, CATALOGUE)
    context = [turn("user", "C"), turn("assistant", "D")]
    assert repeat_context(context) == ["D", "C"]
    # repeat D, C; then cooc B=2, A=1, then popularity without duplicates
    assert repeat_then(context, co) == ["D", "C", "B", "A", "E", "F"]
    assert repeat_then(context, co, k=3) == ["D", "C", "B"]
    assert repeat_then([turn("user")], co) == co.rank([])
    # repeat D, C; then the popularity list without them
    pop = co.popularity
    assert repeat_then(context, pop) == ["D", "C"] + [i for i in pop.ranked if i not in ("D", "C")]


# ----------------------------------------------------------------------------- dialog metrics

def test_replace_spans_string_and_tokens():
    assert replace_spans("Try <BOI><a_1><b_7><EOI>, it is great.") == "Try <movie> , it is great."
    assert replace_spans("<BOI><a_1><EOI> or<BOI><a_2><EOI>?") == "<movie> or <movie> ?"
    assert replace_spans("I loved @{m0042} and @{m_7.x}!") == "I loved <movie> and <movie> !"
    assert replace_spans("cut off <BOI><a_1>") == "cut off <movie>"
    assert replace_spans("no items here") == "no items here"
    toks = ["Try", "<BOI>", "<a_1>", "<b_2>", "<EOI>", "and", "<BOI>", "<a_3>", "<EOI>", "."]
    assert replace_spans(toks) == ["Try", "<movie>", "and", "<movie>", "."]
    assert replace_spans(["x", "<BOI>", "<a_1>"]) == ["x", "<movie>"]


def test_distinct_hand_computed():
    sents = ["the cat sat", "the cat ran."]  # 13a: [the cat sat] [the cat ran .]
    # unigrams: 7 total, 5 unique; bigrams: 5 total, 4 unique; trigrams: 3 total, 3 unique
    assert distinct_ratio(sents, 1) == pytest.approx(5 / 7)
    assert distinct_ratio(sents, 2) == pytest.approx(4 / 5)
    assert distinct_ratio(sents, 3) == pytest.approx(1.0)
    assert distinct_per_sentence(sents, 1) == pytest.approx(5 / 2)
    assert distinct_per_sentence(sents, 2) == pytest.approx(4 / 2)
    assert distinct_ratio(["hi"], 2) == 0.0 and distinct_per_sentence([], 2) == 0.0


def test_perplexity():
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# hypothesis / reference pairs covering punctuation, numbers, hyphens, entities, case, unicode, empties
PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("the cat is on the mat", "There is a cat on the mat."),
    ("Hello, world!", "Hello world!"),
    ("I paid $1,000.50 for 3-4 tickets.", "I paid $1,000.50 for three tickets."),
    ("It was 1987; a great year (really).", "1987 was a great year, really!"),
    ("", "You might like <movie> ."),
    ("You might like <movie>.", "You might like <movie> , it is a fun horror."),
    ("Have you seen <movie>? It's great", "Have you seen <movie> ? It is great."),
    ("well-known sci-fi", "a well-known sci-fi film"),
    ("e.g. Mr. Smith's 2nd film", "e.g. Mr. Smith's second film"),
    ("Tom &amp; Jerry &quot;cartoon&quot;", 'Tom & Jerry "cartoon"'),
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9.", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 !"),
    ("yes", "yes"),
    ("no", "yes"),
    ("OK", "ok"),
    ("a b c d e f g", "a b c d e f g h i j"),
    ("a b c d e f g h i j k l", "a b c d"),
    ("the the the the the", "the cat"),
    ("Sure! What genres do you like? Horror, comedy...", "What kind of movies do you like?"),
    ("I love 80s movies: <movie>, <movie> and <movie>.", "I love <movie> and <movie> from the 80s."),
    ("Price: 10.5-12 dollars, 50% off", "10.5 - 12 dollars ; 50 % off"),
    ("   spaced    out   text   ", "spaced out text"),
    ("Line one\nline two", "Line one line two"),
    ("trailing hyphen-\nword", "trailing hyphenword"),
    ("[brackets] {braces} <angles> |pipes| ~tilde^ `tick` \\slash/", "brackets braces angles pipes"),
    ("Goodbye.", "Bye!"),
    ("", ""),
    ("Enjoy <movie>!", ""),
    ("3.14, 2,5 and 1-2-3", "3.14 , 2,5 and 1 - 2 - 3"),
    ("He said: \"it's 'fine'\".", "He said it's fine."),
    ("WOW!!! That's AMAZING!!!", "wow, that's amazing"),
    ("Have a good night", "Have a good night!"),
]


def test_tokenize_13a_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    reference = Tokenizer13a()
    for line in [s for pair in PAIRS for s in pair]:
        assert tokenize_13a(line) == reference(line).split(), repr(line)


def test_corpus_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]

    def check(h, r):
        expected = sacrebleu.corpus_bleu(h, [r]).score
        assert corpus_bleu(h, r) == pytest.approx(expected, abs=1e-6), (h, r)
        return expected

    assert 0 < check(hyps, refs) < 100
    # every pair alone (corpus of one: zero-match orders, empty hypotheses, brevity penalty)
    for h, r in PAIRS:
        check([h], [r])
    # sliding sub-corpora, so that the smoothing / brevity cases mix
    for i in range(len(PAIRS) - 3):
        check(hyps[i:i + 4], refs[i:i + 4])
    assert check(hyps[:1], refs[:1]) == pytest.approx(100.0)
    assert check(["", ""], ["a b", "c"]) == 0.0


def test_corpus_bleu_length_mismatch():
    with pytest.raises(ValueError):
        corpus_bleu(["a"], ["a", "b"])


def test_distinct_keeps_movie_one_token():
    # 13a alone splits "<movie>" into "<", "movie", ">", which inflates Distinct-n with fake n-grams
    sents = ["try <movie> now", "try <movie> later"]
    assert distinct_ratio(sents, 1) == pytest.approx(4 / 6)  # try <movie> now later of 6 tokens
    assert distinct_ratio(sents, 2) == pytest.approx(3 / 4)  # (try,<movie>) twice, (<movie>,now), (<movie>,later)


def test_intent_metrics_and_calibration():
    from nanocrs.metrics import calibrate_intent, intent_metrics
    p = [0.1, 0.2, 0.3, 0.35, 0.4, 0.6]
    gold = [False, False, True, True, False, True]
    m = intent_metrics(p, gold)  # argmax: only 0.6 is REC
    assert m["rec_precision"] == 1.0 and m["rec_recall"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    t = calibrate_intent(p, gold)
    assert t == 0.3  # REC for 0.3, 0.35, 0.4, 0.6: precision 3/4, recall 1: the best F1
    m = intent_metrics(p, gold, t)
    assert (m["rec_precision"], m["rec_recall"]) == (0.75, 1.0)


def test_choose_copy_bias_best_r1_within_the_guards():
    from nanocrs.metrics import choose_copy_bias
    def m(r1, r10, fresh):
        return {"recall@1": r1, "recall@10": r10, "fresh_recall@10": fresh}
    grid = {0.0: m(0.040, 0.250, 0.200), 1.0: m(0.045, 0.251, 0.199), 2.0: m(0.050, 0.249, 0.199),
            3.0: m(0.055, 0.252, 0.190)}
    assert choose_copy_bias(grid) == 1.0  # 2.0 loses R@10, 3.0 fresh R@10 beyond the slack
    assert choose_copy_bias(grid, r10_slack=0.01) == 2.0
    assert choose_copy_bias({0.0: m(0.04, 0.25, 0.2), 0.5: m(0.04, 0.25, 0.2)}) == 0.0  # ties: the smaller
    assert choose_copy_bias({0.0: m(0.05, 0.25, 0.2), 0.5: m(0.04, 0.25, 0.2)}) == 0.0
