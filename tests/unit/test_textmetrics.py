"""BLEU-4, ROUGE-L, fact exact match, CJK tokenisation and the retention score, on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from toolkit.quality.retention import RETENTION_SET, is_accepted, retention_questions, score_retention
from toolkit.quality.textmetrics import (
    contains_facts,
    corpus_bleu,
    corpus_rouge_l,
    fact_exact_match,
    rouge_l,
    score_answers,
    tokenize,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("耳机保修24个月。", ["耳", "机", "保", "修", "24", "个", "月", "。"]),
        ("ＡirWave　Ｐro：９：００", ["airwave", "pro", ":", "9", ":", "00"]),  # full-width -> half-width
        ("Bluepeak耳机", ["bluepeak", "耳", "机"]),  # latin word glued to CJK is split off
        ("it's $199 🎉", ["it", "'", "s", "$", "199", "🎉"]),
        ("カタカナ", ["カ", "タ", "カ", "ナ"]),
        ("snake_case", ["snake", "_", "case"]),
        ("", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_bleu_identical_is_one_and_disjoint_is_zero() -> None:
    refs = ["The warranty lasts 24 months.", "退货期限为30天。"]
    assert corpus_bleu(refs, refs) == pytest.approx(1.0)
    assert corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert corpus_bleu([""], ["anything"]) == 0.0


def test_bleu_hand_computed() -> None:
    # p1 = 5/6; p2 = (3+1)/(5+1); p3 = (1+1)/(4+1); p4 = (0+1)/(3+1); equal lengths, so BP = 1
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.4855, abs=1e-4)


def test_bleu_brevity_penalty() -> None:
    # every hypothesis n-gram matches (smoothed orders with no n-grams give 1/1); c=2, r=6: BP = e^(1-3)
    assert corpus_bleu(["the cat"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-2))


def test_bleu_is_corpus_level_and_takes_alternative_references() -> None:
    hyps = ["the cat sat on the mat", "hello there"]
    # corpus BLEU pools counts: not the mean of sentence scores
    pooled = corpus_bleu(hyps, ["the cat is on the mat", "hello there"])
    assert corpus_bleu(hyps[:1], ["the cat is on the mat"]) < pooled < 1.0
    assert corpus_bleu(hyps[:1], [["the cat is on the mat", "the cat sat on the mat"]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(hyps, ["x"])


def test_bleu_chinese_is_character_level() -> None:
    # without CJK tokenisation each side would be one "word" and share nothing
    score = corpus_bleu(["耳机保修期为24个月。"], ["耳机保修24个月。"])
    assert 0.3 < score < 1.0


def test_rouge_l() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("completely different words", "nothing shared here") == 0.0
    # LCS "the cat on the mat" = 5 of 6 on both sides
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # 保 修 24 个 月 (5) inside 保 修 期 为 24 个 月 (7): P = 1, R = 5/7, F = 10/12
    assert rouge_l("保修24个月", "保修期为24个月") == pytest.approx(10 / 12)
    assert rouge_l("a b", ["x y", "a b"]) == pytest.approx(1.0)  # best alternative reference
    assert corpus_rouge_l(["a b", "c d"], ["a b", "x y"]) == pytest.approx(0.5)
    assert corpus_rouge_l([], []) == 0.0


def test_fact_exact_match_normalises_case_width_and_space() -> None:
    assert contains_facts("Our hours are 9:00 to 18:00.", ["9:00", "18:00"])
    assert contains_facts("保修期为２４ 个月", ["24个月"])  # full-width digits and a space
    assert contains_facts("THE WARRANTY IS 24 MONTHS", ["24 months"])
    assert not contains_facts("Our hours are 9:00 to 17:00.", ["9:00", "18:00"])  # needs every fact
    answers = ["open 9:00-18:00", "24 months", "no idea", "anything"]
    facts = [["9:00", "18:00"], ["24 months"], ["30天"], []]
    # the fact-less example is left out of the denominator: 2 of 3
    assert fact_exact_match(answers, facts) == pytest.approx(2 / 3)
    assert fact_exact_match(["x"], [[]]) == 0.0
    with pytest.raises(ValueError):
        fact_exact_match(["x"], [])


def test_score_answers_bundles_everything() -> None:
    scores = score_answers(["24 months of warranty"], ["24 months of warranty"], [["24 months"]])
    assert scores.as_dict() == {"bleu4": 1.0, "rouge_l": 1.0, "fact_em": 1.0, "examples": 1, "examples_with_facts": 1}


# --- retention ----------------------------------------------------------------------------------


def test_retention_keyword_matching() -> None:
    assert is_accepted("The capital of France is Paris.", ["paris"])
    assert is_accepted("A week has 7 days.", ["7", "seven"])
    assert not is_accepted("There are 17 days.", ["7", "seven"])  # whole tokens, not substrings
    assert is_accepted("中国的首都是北京。", ["北京"])
    assert is_accepted("１＋１＝２", ["2"])  # full-width digits
    assert not is_accepted("Bluepeak offers a 24-month warranty.", ["paris"])


def test_retention_score_all_right_some_wrong_and_length_checked() -> None:
    right = [f"The answer is {item.accepted[0]}." for item in RETENTION_SET]
    assert score_retention(right).score == 1.0
    wrong = list(right)
    wrong[0] = "Bluepeak headphones have a 24 months warranty."
    result = score_retention(wrong)
    assert result.correct == len(RETENTION_SET) - 1 and result.total == len(RETENTION_SET)
    assert result.per_question[0]["correct"] is False
    assert result.per_question[0]["question"] == retention_questions()[0]
    with pytest.raises(ValueError, match="retention questions"):
        score_retention(["Paris"])


def test_retention_set_shape() -> None:
    assert 10 <= len(RETENTION_SET) <= 16
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in item.question) for item in RETENTION_SET)
    assert "What is the capital of France?" in retention_questions()
