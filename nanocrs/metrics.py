"""
Ranking metrics and the non-learned baselines they are always reported beside.

One evaluation sample = (dialog context, one gold item the recommender mentioned in its turn). For a
ranked list of item ids (best first):
    Recall@k = 1 if gold in the top k         NDCG@k = 1/log2(rank + 1)         MRR@k = 1/rank
(rank counted from 1; 0 when the gold item is not in the top k), each averaged over samples.
A beam-search list of width W is not a full ranking: metrics at k <= W only.

Baselines, computed on the same samples:
    popularity   items ranked by how often recommenders mentioned them in the training dialogs
    repeat       the items already mentioned in this dialog, latest first (the "repetition shortcut")
    oracle       (synthetic world only) the generator's own ranked list of what its rule allows
    cooc         items co-mentioned with the context's items in training dialogs (falls back to popularity)
    repeat+pop   the repeat list, then the popularity list without duplicates
    repeat+cooc  the repeat list, then the cooc list without duplicates

Dialog metrics (the paper's conventions, section 5.3):
    replace_spans      every <BOI>...<EOI> span (and every @{id} mention) -> one "<movie>" token, before scoring
    corpus_bleu        SacreBLEU's default corpus BLEU (13a tokenization, 4-gram, 'exp' smoothing, x100),
                       reimplemented here; tests/test_metrics.py checks it against the sacrebleu package
    distinct_ratio     unique n-grams / total n-grams over the corpus (the paper's Distinct-n, <= 1)
    distinct_per_sentence  unique n-grams over the corpus / number of sentences (CRSLab / UniCRS, can be > 1)
    perplexity         exp(total NLL / total tokens), corpus level

    hyps = [replace_spans(h) for h in generated]; refs = [replace_spans(r) for r in reference_texts]
    bleu = corpus_bleu(hyps, refs); d2 = distinct_ratio(hyps, 2)
"""

import math
import re
import string
from collections import Counter

from nanocrs.data import MENTION
from nanocrs.tokenizer import BOI, EOI

RECALL_KS = (1, 5, 10, 20, 50)
RANK_KS = (5, 10, 20)


def rank_of(ranked: list, gold) -> int:
    """1-based rank of gold in ranked, or 0 if absent."""
    try:
        return ranked.index(gold) + 1
    except ValueError:
        return 0


def rank_metrics(ranks: list[int]) -> dict:
    """Average metrics over samples from each sample's 1-based rank of the gold item (0 = not found)."""
    n = max(len(ranks), 1)
    m = {}
    for k in RECALL_KS:
        m[f"recall@{k}"] = sum(1 for r in ranks if 0 < r <= k) / n
    for k in RANK_KS:
        m[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if 0 < r <= k) / n
        m[f"mrr@{k}"] = sum(1 / r for r in ranks if 0 < r <= k) / n
    return m


def recommended_counts(dialogs: list[dict]) -> Counter:
    """item -> how many times a recommender (assistant) turn of `dialogs` mentions it."""
    return Counter(i for d in dialogs for t in d["turns"] if t["role"] == "assistant" for i in t["items"])


class Popularity:
    """Items ranked by recommender mentions in the training dialogs (ties: id order, deterministic)."""

    def __init__(self, train_dialogs: list[dict], catalogue: list[str]):
        counts = recommended_counts(train_dialogs)
        self.ranked = sorted(catalogue, key=lambda i: (-counts[i], i))

    def rank(self, context: list[dict], k: int = 50) -> list[str]:
        return self.ranked[:k]


def repeat_context(context: list[dict], k: int = 50) -> list[str]:
    """The context's items, most recently mentioned first."""
    seen = {}
    for t, turn in enumerate(context):
        for j, item in enumerate(turn["items"]):
            seen[item] = (t, j)
    return sorted(seen, key=lambda i: seen[i], reverse=True)[:k]


RECENCY_DECAYS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # the grid the recency-weighted baseline chooses from on val


class CoOccurrence:
    """Items ranked by how often they were mentioned in the same training dialog as the context's items.

    cooc[a][b] = number of training dialogs that mention both a and b (any role, a != b; a dialog counts
    once per pair however often it repeats them). A candidate's score is the plain sum of cooc[i][c] over
    the distinct items i of the context: every context item weighs the same. With decay < 1 the k-th
    latest distinct context item weighs decay**k instead (recency-weighted co-occurrence).
    Items already in the context are NOT excluded (they can score through the other context items; an
    item never co-occurs with itself). Ties, and everything scoring 0, follow the popularity order
    (recommender mentions, then id), so a context without items gets exactly the popularity list.
    """

    def __init__(self, train_dialogs: list[dict], catalogue: list[str], decay: float = 1.0):
        known = set(catalogue)
        self.decay = decay  # < 1: the k-th latest distinct context item weighs decay**k (recency-weighted)
        self.cooc: dict[str, Counter] = {}
        for d in train_dialogs:
            items = sorted({i for t in d["turns"] for i in t["items"] if i in known})
            for a in items:
                for b in items:
                    if a != b:
                        self.cooc.setdefault(a, Counter())[b] += 1
        self.popularity = Popularity(train_dialogs, catalogue)
        self.pop_pos = {item: p for p, item in enumerate(self.popularity.ranked)}

    def rank(self, context: list[dict], k: int = 50) -> list[str]:
        scores = Counter()  # float counts with a decay
        if self.decay == 1.0:
            for i in {i for turn in context for i in turn["items"]}:
                scores.update(self.cooc.get(i, {}))
        else:
            for age, i in enumerate(repeat_context(context, k=len(self.pop_pos))):  # latest first
                w = self.decay ** age
                for c, n in self.cooc.get(i, {}).items():
                    scores[c] += w * n
        # only the few items that co-occur need sorting; the rest keep the precomputed popularity order
        scored = sorted(scores, key=lambda c: (-scores[c], self.pop_pos[c]))[:k]
        if len(scored) < k:
            taken = set(scored)
            scored += [i for i in self.popularity.ranked if i not in taken][:k - len(scored)]
        return scored


def repeat_then(context: list[dict], ranker, k: int = 50) -> list[str]:
    """The context's items (latest first), then ranker's list (Popularity or CoOccurrence) without duplicates."""
    ranked = repeat_context(context, k)
    seen = set(ranked)
    # ask for k more than needed: at most len(ranked) of the ranker's list can be duplicates
    ranked += [i for i in ranker.rank(context, k + len(ranked)) if i not in seen]
    return ranked[:k]


# -----------------------------------------------------------------------------
# free-mode intent: does the model choose <MODE=REC> when the recommender did?

def intent_metrics(p_rec: list[float], is_rec: list[bool], threshold: float = 0.5) -> dict:
    """Accuracy, and precision / recall / F1 of REC, when the model picks REC wherever
    p(REC) / (p(REC) + p(CHAT)) >= threshold (0.5 is the plain argmax between the two modes)."""
    pred = [p >= threshold for p in p_rec]
    tp = sum(a and b for a, b in zip(pred, is_rec))
    n_pred, n_gold = sum(pred), sum(is_rec)
    prec, rec = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return {"threshold": threshold, "accuracy": sum(a == b for a, b in zip(pred, is_rec)) / max(len(pred), 1),
            "rec_precision": prec, "rec_recall": rec, "rec_f1": 2 * prec * rec / max(prec + rec, 1e-12),
            "n_turns": len(pred), "n_rec": n_gold}


def calibrate_intent(p_rec: list[float], is_rec: list[bool]) -> float:
    """The REC threshold with the best F1 of REC on these turns (meant for the validation split).

    A model trained on dialogs where most assistant turns chat learns that prior: with the plain
    argmax it almost never opens with <MODE=REC>, so a chat user asking for a movie gets none. The
    threshold is one number read off held-out turns, so it moves the decision, not the model."""
    # one sweep from the highest p down: at threshold t, REC is predicted for every p >= t
    pairs = sorted(zip(p_rec, is_rec), reverse=True)
    n_gold, best, tp, k = sum(is_rec), (-1.0, 0.0, -0.5), 0, 0  # (F1, -|t - 0.5|, -t); any F1 beats -1
    while k < len(pairs):
        t = pairs[k][0]
        while k < len(pairs) and pairs[k][0] == t:  # equal probabilities fall on the same side
            tp, k = tp + pairs[k][1], k + 1
        prec, rec = tp / k, tp / max(n_gold, 1)  # as intent_metrics computes them, to the last bit
        f1 = 2 * prec * rec / max(prec + rec, 1e-12)
        best = max(best, (f1, -abs(t - 0.5), -t))  # ties: the threshold nearest 0.5, then the lower
    return -best[2]


COPY_BIASES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # the copy gate biases sample.py --calibrate copy tries on val


def choose_copy_bias(grid: dict, r10_slack: float = 0.0, fresh_slack: float = 0.002) -> float:
    """The copy gate's bias (nanocrs/heads.py) with the best R@1 on these samples (meant for the
    validation split), among the biases that keep R@10 and fresh R@10 within the slacks of bias 0
    (R@10 not below it; fresh R@10, which a larger bias can only lower, at most fresh_slack below).
    grid: bias -> {"recall@1", "recall@10", "fresh_recall@10"}; ties go to the smaller bias.
    Why the guard: a larger bias puts named items first; past some point it also pushes new items
    out of the top ten, which R@1 alone would not see."""
    base = grid[0.0]
    ok = [b for b, m in grid.items() if m["recall@10"] >= base["recall@10"] - r10_slack
          and m["fresh_recall@10"] >= base["fresh_recall@10"] - fresh_slack]
    return max(sorted(ok), key=lambda b: grid[b]["recall@1"])  # max keeps the first (smallest) of equals


TEXT_PRIORS = (0.0, 2.0, 5.0, 10.0, 20.0)  # the text prior's weights tau sample.py --calibrate text tries on val


def choose_text_prior(grid: dict) -> float:
    """The text prior's weight (nanocrs/heads.py TextPrior) with the best R@10 on these samples (meant
    for the validation split), among those whose fresh R@10 is not below tau = 0's; ties go to the
    smaller tau. grid: tau -> {"recall@1", "recall@10", "fresh_recall@10"}."""
    ok = [t for t, m in grid.items() if m["fresh_recall@10"] >= grid[0.0]["fresh_recall@10"]]
    return max(sorted(ok), key=lambda t: grid[t]["recall@10"])


# -----------------------------------------------------------------------------
# dialog metrics

MOVIE = "<movie>"
_SPAN = re.compile(re.escape(BOI) + r".*?(?:" + re.escape(EOI) + r"|$)", re.S)  # an unclosed span runs to the end


def replace_spans(text: str | list[str]) -> str | list[str]:
    """Replace each <BOI>...<EOI> item span by one "<movie>" token, in a decoded string or a list of token strings.

    Strings: the schema's @{id} mentions are replaced too (so references and generations are treated
    alike), the token is set off by single spaces, and the ends are stripped. A <BOI> with no <EOI>
    (generation cut off) swallows the rest; a stray <EOI> is left as it is.
    """
    if isinstance(text, str):
        text = _SPAN.sub(f" {MOVIE} ", MENTION.sub(f" {MOVIE} ", text))
        return re.sub(r" {2,}", " ", text).strip()
    out, inside = [], False
    for tok in text:
        if tok == BOI and not inside:
            out.append(MOVIE)
            inside = True
        elif inside:
            inside = tok != EOI
        else:
            out.append(tok)
    return out


# mteval-v13a (SacreBLEU's default tokenizer): ASCII punctuation except ' , - . is always split off;
# "." and "," only when not between digits (1,000.5 stays whole); "-" only after a digit.
_13A_ALWAYS = re.compile("([" + re.escape("".join(c for c in string.punctuation if c not in "',-.")) + "])")
_13A_STEPS = [(_13A_ALWAYS, r" \1 "), (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
              (re.compile(r"([.,])([^0-9])"), r" \1 \2"), (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(line: str) -> list[str]:
    """SacreBLEU's '13a' tokenization, as a list of tokens (case kept)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "  # the rules look at the neighbouring character, so give the ends one
    for pattern, repl in _13A_STEPS:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU x100, one reference per hypothesis, equal to sacrebleu.corpus_bleu(hyps, [refs]).score.

    Clipped n-gram matches and lengths are summed over the corpus before the precisions are taken.
    'exp' smoothing (mteval's): the j-th order with zero matches gets precision 1 / (2^j * total).
    An order with no hypothesis n-grams at all makes the score 0, as in SacreBLEU.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * max_n, [0] * max_n
    sys_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenize_13a(hyp.rstrip()), tokenize_13a(ref.rstrip())
        sys_len, ref_len = sys_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc, rc = Counter(_ngrams(h, n)), Counter(_ngrams(r, n))
            total[n - 1] += sum(hc.values())
            correct[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
    if not any(correct) or not all(total):
        return 0.0
    log_p, halvings = 0.0, 1
    for c, t in zip(correct, total):
        if c == 0:
            halvings *= 2
            log_p += math.log(1 / (halvings * t))
        else:
            log_p += math.log(c / t)
    # brevity penalty: only a corpus shorter than its references is penalised
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return 100 * bp * math.exp(log_p / max_n)


def distinct_tokens(sentence: str) -> list[str]:
    """13a tokens, with each "<movie>" kept as ONE token (13a alone would split it into < movie >)."""
    out = []
    for k, part in enumerate(sentence.split(MOVIE)):
        out += ([MOVIE] if k else []) + tokenize_13a(part)
    return out


def distinct_ratio(sentences: list[str], n: int) -> float:
    """The paper's Distinct-n: unique n-grams / total n-grams over the corpus (tokens: distinct_tokens)."""
    grams = [g for s in sentences for g in _ngrams(distinct_tokens(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_per_sentence(sentences: list[str], n: int) -> float:
    """CRSLab / UniCRS Distinct-n: unique n-grams over the corpus / number of sentences (can exceed 1)."""
    grams = {g for s in sentences for g in _ngrams(distinct_tokens(s), n)}
    return len(grams) / len(sentences) if sentences else 0.0


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Corpus perplexity from summed token NLL (nats) and the number of scored tokens."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity: total_tokens must be positive, got {total_tokens}")
    return math.exp(total_nll / total_tokens)


# -----------------------------------------------------------------------------

def format_table(rows: dict[str, dict], keys: list[str]) -> str:
    """A plain text table: one row per method, one column per metric."""
    name_w = max(len(n) for n in rows) + 2
    head = "method".ljust(name_w) + "".join(k.rjust(10) for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(name.ljust(name_w) + "".join(f"{m.get(k, float('nan')):10.4f}" for k in keys))
    return "\n".join(lines)
