"""Character n-gram naive Bayes: the classic baseline any learned text feature has to beat.

Multinomial naive Bayes over the 1- to 3-grams of a record (of its characters for UTF-8 text,
of its ids for other id sequences), each word boundary marked by the record's start and end,
with add-``alpha`` smoothing. It needs no training beyond counting, so it is the
``char_ngram_nb`` row of every comparison on a ``text`` data source.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def _units(x) -> list:
    """A record's characters (UTF-8 text) or ids, with start/end markers."""
    if isinstance(x, torch.Tensor):
        ids = x.tolist()
        try:
            seq = list(bytes(ids).decode("utf-8")) if max(ids, default=0) < 256 else ids
        except (UnicodeDecodeError, ValueError):
            seq = ids
    elif isinstance(x, (bytes, bytearray)):
        seq = list(bytes(x).decode("utf-8", errors="replace"))
    elif isinstance(x, str):
        seq = list(x)
    else:
        seq = list(x)
    return ["<s>", *seq, "</s>"]


def ngrams(x, n_max: int = 3) -> Counter:
    """Counts of the 1..n_max-grams of a record."""
    u = _units(x)
    out: Counter = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(u) - n + 1):
            g = tuple(u[i : i + n])
            if g not in (("<s>",), ("</s>",)):
                out[g] += 1
    return out


class NGramNaiveBayes:
    """Multinomial naive Bayes on n-gram counts (``fit`` then ``predict``)."""

    def __init__(self, n_max: int = 3, alpha: float = 0.1):
        self.n_max, self.alpha = n_max, alpha

    def fit(self, xs, ys) -> NGramNaiveBayes:
        self.classes = sorted({int(y) for y in ys})
        self.counts = {c: Counter() for c in self.classes}
        prior = Counter(int(y) for y in ys)
        for x, y in zip(xs, ys):
            self.counts[int(y)].update(ngrams(x, self.n_max))
        self.vocab = set().union(*self.counts.values()) if self.counts else set()
        v = max(1, len(self.vocab))
        self.log_prior = {c: math.log(prior[c] / len(ys)) for c in self.classes}
        self.total = {c: sum(self.counts[c].values()) + self.alpha * v for c in self.classes}
        return self

    def scores(self, x) -> dict[int, float]:
        """Log-posterior (up to a constant) of every class for one record."""
        g = ngrams(x, self.n_max)
        out = {}
        for c in self.classes:
            cc, tot, s = self.counts[c], math.log(self.total[c]), self.log_prior[c]
            for k, n in g.items():
                if k in self.vocab:  # n-grams never seen in training carry no evidence
                    s += n * (math.log(cc.get(k, 0) + self.alpha) - tot)
            out[c] = s
        return out

    def predict(self, xs) -> list[int]:
        return [max(s.items(), key=lambda kv: kv[1])[0] for s in map(self.scores, xs)]


def char_ngram_nb(train: list, test: list, n_max: int = 3, alpha: float = 0.1) -> float:
    """Top-1 accuracy (a fraction) of the n-gram naive Bayes fitted on ``train`` and tested on
    ``test``, both lists of ``(input, label, ...)`` items."""
    train = [t for t in train if int(t[1]) >= 0]
    test = [t for t in test if int(t[1]) >= 0]
    if not train or not test:
        raise ValueError("char_ngram_nb needs labelled training and test items")
    nb = NGramNaiveBayes(n_max, alpha).fit([t[0] for t in train], [t[1] for t in train])
    pred = nb.predict([t[0] for t in test])
    return sum(int(p == int(t[1])) for p, t in zip(pred, test)) / len(test)
