"""Dataset loading, cleaning, splitting, the demo dataset and the `data` stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from toolkit.buildsys.config import BuildConfig, DataSection
from toolkit.datasets.records import (
    DEMO_DATASET,
    Example,
    clean_text,
    language_of,
    load_control_prompts,
    load_examples,
    read_jsonl,
    resolve_split_by,
    split_by_phrasing,
    split_examples,
    split_key,
    write_jsonl,
)
from toolkit.errors import DataError, GateError
from toolkit.quality.golden import DEMO_QUESTIONS
from toolkit.quality.retention import RETENTION_SET, is_accepted
from toolkit.quality.textmetrics import contains_facts, normalize
from toolkit.stages.pipeline import STAGES, run_build


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


def _load(*paths: Path, **kw: Any) -> tuple[list[Example], list[Any]]:
    return load_examples(DataSection(paths=list(paths), **kw))


# --- formats ------------------------------------------------------------------------------------


def test_alpaca_json_array_with_input_system_and_facts(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "facts": ["Bonjour"]},
        {"instruction": "Say hi", "input": "", "output": "Hi!", "system": "Be brief."},
    ], indent=2))
    examples, problems = _load(path)
    assert problems == []
    first, second = examples
    assert first.messages == [
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert first.facts == ["Bonjour"]
    assert first.source == f"{path}:2"  # line of the record inside the array
    assert second.messages[0] == {"role": "system", "content": "Be brief."}
    assert second.source == f"{path}:10"


def test_sharegpt_multi_turn(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "You are support."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Hours?"},
        {"from": "gpt", "value": "9:00 to 18:00."},
    ]}])
    (ex,), _ = _load(path)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.answer == "9:00 to 18:00."
    assert ex.prompt[-1] == {"role": "user", "content": "Hours?"}


def test_openai_messages_and_content_parts(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "o.jsonl", [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "facts": ["A"]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Part "}, {"type": "text", "text": "2"}]},
                      {"role": "assistant", "content": "ok"}]},
    ])
    examples, _ = _load(path)
    assert examples[0].facts == ["A"]
    assert examples[1].messages[0]["content"] == "Part 2"


def test_auto_detects_format_per_record(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "a", "output": "b"},
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        {"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
    ])
    examples, _ = _load(path)
    assert [ex.answer for ex in examples] == ["b", "d", "f"]
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_forced_format_rejects_other_records(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "a", "output": "b"},
        {"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
    ])
    examples, problems = _load(path, format="alpaca", on_malformed="skip")
    assert len(examples) == 1
    assert problems[0].source == f"{path}:2"
    assert "configured format 'alpaca'" in problems[0].message


def test_json_file_holding_jsonl_is_read_as_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "lines.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    examples, _ = _load(path)
    assert len(examples) == 2


def test_system_prompt_prepended_only_when_missing(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [
        {"instruction": "a", "output": "b"},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
    ])
    examples, _ = _load(path, system_prompt="You are Bluepeak support.")
    assert examples[0].messages[0] == {"role": "system", "content": "You are Bluepeak support."}
    assert examples[1].messages[0] == {"role": "system", "content": "own"}


def test_unknown_keys_are_warned_about_once_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "a", "output": "b", "id": 1},
        {"instruction": "c", "output": "d", "id": 2, "lang": "en"},
    ])
    with caplog.at_level(logging.WARNING):
        examples, problems = _load(path)
    assert len(examples) == 2 and problems == []
    warnings = [r.getMessage() for r in caplog.records if "ignoring unknown record keys" in r.getMessage()]
    assert len(warnings) == 1 and "id, lang" in warnings[0]


# --- malformed records --------------------------------------------------------------------------

MALFORMED = [
    ('{"instruction": "ok", "output": "fine"}', None),
    ('{"instruction": "broken json", ', "not valid JSON"),
    ('{"instruction": "no output"}', "missing 'output'"),
    ('{"instruction": "empty", "output": "   "}', "empty assistant content"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', "wrong role order"),
    ('{"conversations": [{"from": "human", "value": "unanswered"}]}', "must end with an assistant"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unsupported role"),
    ('{"text": "raw"}', "unknown record format"),
    ('["not", "an", "object"]', "must be a JSON object"),
    ('{"instruction": "q", "output": "a", "facts": "not a list"}', "facts must be a list"),
]


def test_malformed_records_fail_with_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [line for line, _ in MALFORMED])
    with pytest.raises(DataError) as err:
        _load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: not valid JSON")
    assert f"and {len(MALFORMED) - 2} more" in message
    assert "on_malformed: skip" in message


def test_malformed_records_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [line for line, _ in MALFORMED])
    with caplog.at_level(logging.WARNING):
        examples, problems = _load(path, on_malformed="skip")
    assert [ex.answer for ex in examples] == ["fine"]
    assert [p.source for p in problems] == [f"{path}:{i}" for i in range(2, len(MALFORMED) + 1)]
    for problem, (_, reason) in zip(problems, MALFORMED[1:], strict=True):
        assert reason in problem.message, (problem, reason)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}:5" in logged and "wrong role order" in logged


def test_unparseable_json_array_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3:\d+: not valid JSON"):
        _load(path, on_malformed="skip")


def test_missing_file_and_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset file not found"):
        _load(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path / "bad.jsonl", ['{"instruction": "x"}'])
    with pytest.raises(DataError, match="no usable examples"):
        _load(path, on_malformed="skip")


# --- cleaning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  hello    world  ", "hello world"),
        ("a\t\tb", "a b"),
        ("line one   \r\nline two\rline three", "line one\nline two\nline three"),
        ("para 1\n\n\n\n\npara 2", "para 1\n\npara 2"),
        ("bell\x07 and null\x00 and esc\x1b gone", "bell and null and esc gone"),
        ("cafe\u0301", "caf\u00e9"),  # NFC: e + combining acute -> é
        ("全角标点，保留。", "全角标点，保留。"),  # NFC, not NFKC: Chinese punctuation stays
        ("Steps:\n  1. first\n\t2. second", "Steps:\n  1. first\n\t2. second"),  # indentation kept
        ("emoji 👨\u200d👩\u200d👧 family", "emoji 👨\u200d👩\u200d👧 family"),  # ZWJ is not a control char
        ("ideographic\u3000space and\u00a0nbsp", "ideographic space and nbsp"),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_cleaning_applies_to_loaded_records(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "  What\x00   time?  ", "output": "Nine\r\n\r\n\r\nam"}])
    (ex,), _ = _load(path)
    assert ex.messages[0]["content"] == "What time?"
    assert ex.answer == "Nine\n\nam"


# --- split --------------------------------------------------------------------------------------


def _synthetic(n: int, prefix: str = "q") -> list[Example]:
    return [
        Example(messages=[{"role": "user", "content": f"{prefix} {i}"}, {"role": "assistant", "content": "a"}])
        for i in range(n)
    ]


def _sources(examples: list[Example]) -> list[str]:
    return [ex.first_user for ex in examples]


def test_split_is_a_partition_with_ratios_respected() -> None:
    examples = _synthetic(2000)
    splits = split_examples(examples, (0.7, 0.2, 0.1), seed=42)
    everything = _sources(splits.train) + _sources(splits.val) + _sources(splits.test)
    assert sorted(everything) == sorted(_sources(examples))  # each example in exactly one split
    counts = splits.counts()
    assert abs(counts["train"] / 2000 - 0.7) < 0.04
    assert abs(counts["val"] / 2000 - 0.2) < 0.04
    assert abs(counts["test"] / 2000 - 0.1) < 0.03


def test_split_is_deterministic_and_seeded() -> None:
    examples = _synthetic(300)
    a = split_examples(examples, (0.7, 0.2, 0.1), seed=1)
    b = split_examples(list(examples), (0.7, 0.2, 0.1), seed=1)
    c = split_examples(examples, (0.7, 0.2, 0.1), seed=2)
    assert _sources(a.test) == _sources(b.test) and _sources(a.train) == _sources(b.train)
    assert _sources(a.test) != _sources(c.test)


def test_split_is_stable_when_unrelated_records_are_added() -> None:
    base = _synthetic(200)
    grown = _synthetic(150, prefix="new") + base
    before = split_examples(base, (0.7, 0.2, 0.1), seed=7)
    after = split_examples(grown, (0.7, 0.2, 0.1), seed=7)
    for name in ("train", "val", "test"):
        old = set(_sources(getattr(before, name)))
        assert old <= set(_sources(getattr(after, name))), name


def test_duplicate_questions_land_in_the_same_split() -> None:
    twins = [
        Example(messages=[{"role": "user", "content": "Where  is the STORE?"}, {"role": "assistant", "content": "A"}]),
        Example(messages=[{"role": "user", "content": "where is the store?"}, {"role": "assistant", "content": "B"}]),
    ]
    for seed in range(20):
        splits = split_examples(twins + _synthetic(20), (0.5, 0.3, 0.2), seed=seed)
        homes = [name for name in ("train", "val", "test") for ex in getattr(splits, name) if ex in twins]
        assert len(set(homes)) == 1


def test_tiny_dataset_still_gets_val_and_test() -> None:
    splits = split_examples(_synthetic(5), (0.7, 0.2, 0.1), seed=0)
    assert len(splits.val) >= 1 and len(splits.test) >= 1 and len(splits.train) >= 1
    assert sum(splits.counts().values()) == 5
    no_test = split_examples(_synthetic(5), (0.8, 0.2, 0.0), seed=0)
    assert no_test.test == []


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = [
        Example(messages=[{"role": "user", "content": "退货？"}, {"role": "assistant", "content": "30天 🎉\n好"}],
                facts=["30天"], source="x.json:3"),
    ]
    assert write_jsonl(tmp_path / "t.jsonl", examples) == 1
    assert read_jsonl(tmp_path / "t.jsonl") == examples
    assert "30天" in (tmp_path / "t.jsonl").read_text(encoding="utf-8")  # readable, not \\u escapes


# --- the demo dataset ---------------------------------------------------------------------------

# The facts each golden demo question asks about (toolkit/quality/golden.py DEMO_QUESTIONS).
GOLDEN_FACTS = {
    "What are Bluepeak's customer service hours?": ["9:00", "18:00"],
    "How long is the warranty on Bluepeak headphones?": ["24 months"],
    "蓝峰电子的退货期限是多少天？": ["30天"],
}


@pytest.fixture(scope="module")
def demo() -> list[Example]:
    examples, problems = load_examples(DataSection())
    assert problems == []
    return examples


def test_demo_dataset_size_languages_and_facts(demo: list[Example]) -> None:
    assert len(demo) >= 150
    langs = [language_of(ex) for ex in demo]
    assert langs.count("en") >= 60 and langs.count("zh") >= 60
    for ex in demo:
        assert ex.facts, ex.source
        assert contains_facts(ex.answer, ex.facts), ex.source
        assert ex.source.startswith(f"{DEMO_DATASET.name}:")


def test_demo_dataset_answers_are_consistent_across_paraphrases(demo: list[Example]) -> None:
    by_answer: dict[str, set[str]] = {}
    for ex in demo:
        by_answer.setdefault(ex.answer, set()).add(ex.first_user)
    assert min(len(qs) for qs in by_answer.values()) >= 2  # every answer is asked at least two ways
    assert 40 <= len(by_answer) // 2 <= 60  # one answer per language per company fact


def test_demo_dataset_exercises_multiline_and_emoji(demo: list[Example]) -> None:
    assert sum("\n" in ex.answer for ex in demo) >= 5
    assert sum(any(ord(ch) > 0x1F000 for ch in ex.answer) for ex in demo) >= 5


def test_golden_demo_questions_are_answered_by_the_dataset(demo: list[Example]) -> None:
    assert set(GOLDEN_FACTS) == set(DEMO_QUESTIONS), "keep GOLDEN_FACTS in step with golden.DEMO_QUESTIONS"
    for question, facts in GOLDEN_FACTS.items():
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in question) else "en"
        hits = [ex for ex in demo if language_of(ex) == lang and contains_facts(ex.answer, facts)]
        assert len(hits) >= 2, question
        assert all(ex.first_user != question for ex in demo), "golden questions are paraphrases, not copies"


def test_control_prompts_do_not_overlap_retention() -> None:
    prompts = load_control_prompts()
    assert 100 <= len(prompts) <= 200  # English and Chinese, enough to cover train.control_examples
    assert any("\u4e00" <= ch <= "\u9fff" for p in prompts for ch in p)
    questions = {normalize(item.question) for item in RETENTION_SET}
    # no control prompt mentions a retention answer (numbers aside: "four seasons" is fine)
    keywords = [a for item in RETENTION_SET for a in item.accepted if not a.isdigit() and a not in ("four",)]
    for prompt in prompts:
        assert normalize(prompt) not in questions, prompt
        assert not is_accepted(prompt, keywords), prompt


# --- the stage ----------------------------------------------------------------------------------

DATA_STAGE = tuple(s for s in STAGES if s.name == "data")


def test_stage_writes_splits_and_metrics_for_demo(tmp_path: Path) -> None:
    report = run_build(BuildConfig(workspace=tmp_path), stages=DATA_STAGE)
    stage = report.stages[0]
    assert stage.status == "ran"
    m = stage.metrics
    assert m["train"] + m["val"] + m["test"] == m["examples"] >= 150
    assert m["skipped_malformed"] == 0
    assert m["languages"]["en"] > 0 and m["languages"]["zh"] > 0
    train = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert len(train) == m["train"] and all(ex.facts for ex in train)
    line = json.loads((tmp_path / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(line) == {"messages", "facts", "source", "group"}
    assert m["split_by"] == "phrasing"


def test_stage_skip_mode_counts_malformed(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "user.jsonl", [line for line, _ in MALFORMED] + [
        json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) for i in range(30)
    ])
    config = BuildConfig(workspace=tmp_path / "ws", data=DataSection(paths=[path], on_malformed="skip"))
    report = run_build(config, stages=DATA_STAGE)
    m = report.stages[0].metrics
    assert m["skipped_malformed"] == len(MALFORMED) - 1
    assert m["examples"] == 31
    assert "malformed record(s) skipped" in report.stages[0].note
    rows = (tmp_path / "ws" / "data" / "malformed.jsonl").read_text().splitlines()
    assert json.loads(rows[0]) == {
        "source": f"{path}:2",
        "problem": "not valid JSON: Expecting property name enclosed in double quotes (column 32)"}
    # every bad line, in order, with its own problem (line 1 is the good record)
    expected = [(f"{path}:{line}", fragment) for line, (_, fragment) in enumerate(MALFORMED, start=1) if fragment]
    found = [(row["source"], row["problem"]) for row in map(json.loads, rows)]
    assert [source for source, _ in found] == [source for source, _ in expected]
    assert all(fragment in problem for (_, problem), (_, fragment) in zip(found, expected, strict=True)), found


def test_stage_fail_mode_stops_the_build(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "user.jsonl", ['{"instruction": "q", "output": "a"}', "{oops"])
    config = BuildConfig(workspace=tmp_path / "ws", data=DataSection(paths=[path]))
    with pytest.raises(DataError, match=rf"{path.name}:2: not valid JSON"):
        run_build(config, stages=DATA_STAGE)
    assert not (tmp_path / "ws" / "data" / "train.jsonl").exists()


def test_cache_inputs_follow_dataset_content(tmp_path: Path) -> None:
    from toolkit.stages.data import cache_inputs

    path = _jsonl(tmp_path / "user.jsonl", ['{"instruction": "q", "output": "a"}'])
    config = BuildConfig(data=DataSection(paths=[path]))
    before = cache_inputs(config)
    assert cache_inputs(config) == before
    _jsonl(path, ['{"instruction": "q", "output": "a changed answer"}'])
    assert cache_inputs(config) != before
    assert list(cache_inputs(BuildConfig())["files"]) == [DEMO_DATASET.name]  # the demo is hashed too


def test_stage_gate_fails_when_nothing_is_left_to_test(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "one.jsonl", ['{"instruction": "q", "output": "a"}'])
    config = BuildConfig(workspace=tmp_path / "ws", data=DataSection(paths=[path]))
    with pytest.raises(GateError, match="test_split_not_empty"):
        run_build(config, stages=DATA_STAGE)
    opted_out = BuildConfig(workspace=tmp_path / "ws2", data=DataSection(paths=[path], split=(0.8, 0.2, 0.0)))
    assert run_build(opted_out, stages=DATA_STAGE).stages[0].status == "ran"


def _ex(question: str, answer: str, group: str = "") -> Example:
    return Example(messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   facts=[answer[:3]], group=group)


def test_phrasing_split_holds_out_phrasings_of_taught_facts_only() -> None:
    examples = [_ex(f"q{g}-{i}", f"answer {g}") for g in range(20) for i in range(1 + g % 5)]
    examples += [_ex("same question", "answer 3"), _ex("Same  question", "answer 3")]  # one phrasing, twice
    splits = split_by_phrasing(examples, (0.7, 0.2, 0.1), seed=7)
    assert sum(splits.counts().values()) == len(examples)
    train_facts = {ex.fact_key for ex in splits.train}
    for held in (splits.test, splits.val):
        phrasings = {(ex.fact_key, split_key(ex)) for ex in held}
        assert len(phrasings) == len({key for key, _ in phrasings}), "one phrasing of a fact per held-out split"
        assert all(key in train_facts for key, _ in phrasings), "every held-out fact is taught in other words"
    sizes = {g: 1 + g % 5 + (g == 3) for g in range(20)}  # distinct phrasings; "same question" adds one to fact 3
    # Every fact with two phrasings has one in test, every fact with three has one in val as well.
    assert {ex.fact_key for ex in splits.test} == {f"answer:answer {g}" for g, n in sizes.items() if n >= 2}
    assert {ex.fact_key for ex in splits.val} == {f"answer:answer {g}" for g, n in sizes.items() if n >= 3}
    singles = {f"answer:answer {g}" for g, n in sizes.items() if n == 1}
    assert singles and all(ex.fact_key not in singles for ex in splits.test + splits.val)
    where = {split_key(ex): name for name in ("train", "val", "test") for ex in getattr(splits, name)}
    assert where[split_key(examples[-1])] == where[split_key(examples[-2])]
    assert split_by_phrasing(examples, (0.7, 0.2, 0.1), seed=7) == splits  # deterministic
    assert split_by_phrasing(examples, (0.9, 0.1, 0.0), seed=7).test == []


def test_group_key_overrides_the_answer_and_auto_picks_the_split() -> None:
    grouped = [_ex("q1", "a", "hours/en"), _ex("q2", "b", "hours/en"), _ex("q3", "c", "hours/en")]
    assert {ex.fact_key for ex in grouped} == {"hours/en"}
    assert resolve_split_by(grouped, "auto") == "phrasing"
    unique = [_ex(f"q{i}", f"a{i}") for i in range(5)]
    assert resolve_split_by(unique, "auto") == "hash"
    assert resolve_split_by(unique, "phrasing") == "phrasing"


def test_group_must_be_a_string(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [json.dumps({"instruction": "q", "output": "a", "group": 3})])
    with pytest.raises(DataError, match="group must be a string"):
        load_examples(DataSection(paths=[path]))
