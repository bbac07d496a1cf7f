"""Text metrics in pure Python: CJK-aware tokens, corpus BLEU-4, ROUGE-L, fact exact match.

Tokenisation (:func:`tokenize`): NFKC (full-width -> half-width), lower-case; each CJK ideograph or
kana is one token; runs of letters/digits are one token; every other non-space character
(punctuation, symbols, emoji) is its own token. So "保修24个月。" -> 保 修 24 个 月 。 and
"Hello, World!" -> hello , world !

BLEU is corpus BLEU-4 (Papineni et al. 2002: clipped n-gram counts summed over the corpus, uniform
weights, brevity penalty from the closest reference length) with smoothing method 2 of Chen &
Cherry (2014), after Lin & Och (2004): for n = 2..4, add 1 to both the matched and the total
n-gram count. Unigram precision is not smoothed, so a hypothesis sharing no token with its
reference scores 0, and an exact copy scores 1. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

_CJK = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # compatibility ideographs
    "\U00020000-\U0003134f"  # extensions B-G
)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+|[^\s]", re.UNICODE)

References = Sequence[str] | Sequence[Sequence[str]]


def normalize(text: str) -> str:
    """NFKC (full-width -> half-width, compatibility forms folded) and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(text: str) -> list[str]:
    """CJK-aware tokens: one per CJK character, per latin/digit word, per punctuation or symbol."""
    return _TOKEN.findall(normalize(text))


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _as_ref_lists(references: References, n: int) -> list[list[str]]:
    if len(references) != n:
        raise ValueError(f"{n} hypotheses but {len(references)} references")
    return [[r] if isinstance(r, str) else list(r) for r in references]


def corpus_bleu(hypotheses: Sequence[str], references: References, max_n: int = 4) -> float:
    """Corpus BLEU-4 in [0, 1]; each reference is a string or a list of alternative strings."""
    refs = _as_ref_lists(references, len(hypotheses))
    matched = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, alts in zip(hypotheses, refs, strict=True):
        hyp_toks = tokenize(hyp)
        ref_toks = [tokenize(r) for r in alts]
        hyp_len += len(hyp_toks)
        # closest reference length; ties go to the shorter one (as in sacreBLEU / NLTK)
        ref_len += min((abs(len(r) - len(hyp_toks)), len(r)) for r in ref_toks)[1] if ref_toks else 0
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(hyp_toks, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in ref_toks:
                max_ref |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
            total[n - 1] += max(len(hyp_toks) - n + 1, 0)
    if hyp_len == 0 or matched[0] == 0:
        return 0.0
    log_p = math.log(matched[0] / total[0])
    for n in range(1, max_n):
        log_p += math.log((matched[n] + 1) / (total[n] + 1))  # Chen & Cherry method 2
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_p / max_n)


def _lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) of one hypothesis: LCS over tokens; best over alternative references."""
    alts = [reference] if isinstance(reference, str) else list(reference)
    hyp = tokenize(hypothesis)
    best = 0.0
    for ref_text in alts:
        ref = tokenize(ref_text)
        lcs = _lcs_len(hyp, ref)
        if lcs:
            precision, recall = lcs / len(hyp), lcs / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def corpus_rouge_l(hypotheses: Sequence[str], references: References) -> float:
    """Mean ROUGE-L F1 over examples (0.0 for an empty corpus)."""
    refs = _as_ref_lists(references, len(hypotheses))
    if not hypotheses:
        return 0.0
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, refs, strict=True)) / len(hypotheses)


def normalize_fact(text: str) -> str:
    """Fact matching form: NFKC (full-width -> half-width), case-folded, all whitespace removed."""
    return "".join(normalize(text).split())


def contains_facts(answer: str, facts: Sequence[str]) -> bool:
    """True when the answer contains every fact string (after :func:`normalize_fact` on both)."""
    norm = normalize_fact(answer)
    return all(normalize_fact(f) in norm for f in facts)


def fact_exact_match(answers: Sequence[str], facts: Sequence[Sequence[str]]) -> float:
    """Share of examples with facts whose answer contains all of them; examples without facts are
    left out of the denominator; 0.0 when no example has facts."""
    if len(answers) != len(facts):
        raise ValueError(f"{len(answers)} answers but {len(facts)} fact lists")
    scored = [contains_facts(a, f) for a, f in zip(answers, facts, strict=True) if f]
    return sum(scored) / len(scored) if scored else 0.0


@dataclass(frozen=True)
class TextScores:
    """The evaluation numbers for one model on one split."""

    bleu4: float
    rouge_l: float
    fact_em: float
    examples: int
    examples_with_facts: int

    def as_dict(self, ndigits: int = 4) -> dict[str, Any]:
        return {k: round(v, ndigits) if isinstance(v, float) else v for k, v in asdict(self).items()}


def score_answers(answers: Sequence[str], references: Sequence[str], facts: Sequence[Sequence[str]]) -> TextScores:
    """BLEU-4, ROUGE-L and fact exact match of generated answers against reference answers."""
    return TextScores(
        bleu4=corpus_bleu(answers, references),
        rouge_l=corpus_rouge_l(answers, references),
        fact_em=fact_exact_match(answers, facts),
        examples=len(answers),
        examples_with_facts=sum(1 for f in facts if f),
    )
