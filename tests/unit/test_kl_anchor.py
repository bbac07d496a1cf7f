"""The KL anchor of the fine-tune: KL(base || adapted) on general conversations, the base being the adapters off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from tests.unit.tiny_llm import make_model, make_tokenizer
from toolkit.buildsys.config import LoraSection, TrainSection
from toolkit.model_io.modeling import pad_token_id
from toolkit.training.examples import IGNORE_INDEX, TokenizedExample, build_examples, collate
from toolkit.training.lora import anchor_kl, batch_stream, labelled_logits, lora_model, train_lora
from toolkit.training.teacher import TeacherCache

LORA = LoraSection(rank=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return make_tokenizer()


def _conversations(tok, n: int, topic: str) -> list[TokenizedExample]:  # type: ignore[no-untyped-def]
    out: list[TokenizedExample] = []
    for i in range(n):
        messages = [{"role": "user", "content": f"{topic} question {i}?"},
                    {"role": "assistant", "content": f"The {topic} answer is {i * 7 % 10} units."}]
        out += build_examples(tok, messages, max_seq_len=128)
    return out


def _ordinary_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The base and adapted models' next-token log-probabilities at the labelled positions, from their
    ordinary forward (no cache, the head on every position), in float64."""
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    return F.log_softmax(base[:, :-1][keep].double(), -1), F.log_softmax(adapted[:, :-1][keep].double(), -1)


def _reference_kl(model, batch: dict[str, torch.Tensor]) -> float:  # type: ignore[no-untyped-def]
    """KL(base || adapted) summed over the labelled positions, by the textbook formula
    sum p_base * (log p_base - log p_adapted)."""
    log_p_base, log_p_adapted = _ordinary_log_probs(model, batch)
    return float((log_p_base.exp() * (log_p_base - log_p_adapted)).sum())


def test_kl_is_zero_without_adapters_and_positive_with_trained_ones(tok) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = lora_model(make_model(len(tok)), LORA)
    batch = collate(_conversations(tok, 3, "general"), pad_token_id(tok))
    with torch.no_grad():
        kl, positions = anchor_kl(model, batch)  # fresh adapters (B = 0) change nothing
    assert positions == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    assert abs(float(kl)) < 1e-6
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
        kl, _ = anchor_kl(model, batch)
        assert float(kl) > 1e-3
        assert float(kl) == pytest.approx(_reference_kl(model, batch), rel=1e-4)
        with model.disable_adapter():  # the student is the base model too
            off, _ = anchor_kl(model, batch)
    assert abs(float(off)) < 1e-6


def test_kl_weight_zero_trains_exactly_as_without_the_anchor(tok) -> None:  # type: ignore[no-untyped-def]
    examples, anchors = _conversations(tok, 8, "company"), _conversations(tok, 4, "general")
    train = TrainSection(max_steps=3, batch_size=2, learning_rate=1e-2, warmup_steps=0, kl_weight=0.0)
    torch.manual_seed(1)
    _, plain = train_lora(make_model(len(tok)), tok, examples, [], LORA, train, progress=False)
    torch.manual_seed(1)
    _, zero = train_lora(make_model(len(tok)), tok, examples, [], LORA, train, progress=False,
                         anchor_examples=anchors)
    assert [r["train_loss"] for r in zero.rows] == [r["train_loss"] for r in plain.rows]
    assert all("kl" not in r for r in zero.rows)
    # and the first step's loss is the base model's mean cross-entropy on the first batch, as transformers computes it
    torch.manual_seed(1)
    reference = make_model(len(tok))
    first = next(batch_stream([len(e.input_ids) for e in examples], train.batch_size, train.seed))
    batch = collate([examples[i] for i in first], pad_token_id(tok))
    with torch.no_grad():
        expected = reference(**batch).loss
    assert plain.rows[0]["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_the_anchor_keeps_the_model_closer_to_its_base(tok) -> None:  # type: ignore[no-untyped-def]
    examples, anchors = _conversations(tok, 8, "company"), _conversations(tok, 4, "general")
    pad = pad_token_id(tok)
    drift = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(2)
        train = TrainSection(max_steps=12, batch_size=2, learning_rate=3e-2, warmup_steps=0, kl_weight=weight,
                             kl_batch_size=2)
        model, log = train_lora(make_model(len(tok)), tok, examples, [], LORA, train, progress=False,
                                anchor_examples=anchors)
        if weight:
            assert all(r["kl"] >= 0 for r in log.rows) and len(log.rows) == 12
        with torch.no_grad():
            kl, positions = anchor_kl(model, collate(anchors, pad))
        drift[weight] = float(kl) / positions
    assert drift[0.0] > 0.01
    assert drift[5.0] < drift[0.0] / 2, drift


# ---------------------------------------------------------------- the teacher computed once (top k)


def _perturbed(tok, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = lora_model(make_model(len(tok)), LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    return model


def _grouped_reference_kl(model, batch: dict[str, torch.Tensor], k: int) -> float:  # type: ignore[no-untyped-def]
    """The textbook KL between the two models' distributions with every token outside the base model's k most
    likely merged into one outcome."""
    log_p, log_q = _ordinary_log_probs(model, batch)
    p, q = log_p.exp(), log_q.exp()
    total = 0.0
    for p_row, q_row in zip(p, q, strict=True):
        top = p_row.argsort(descending=True)[:k]
        rest = torch.ones_like(p_row, dtype=torch.bool)
        rest[top] = False
        grouped_p = torch.cat([p_row[top], p_row[rest].sum().view(1)])
        grouped_q = torch.cat([q_row[top], q_row[rest].sum().view(1)])
        total += float((grouped_p * (grouped_p.log() - grouped_q.log())).sum())
    return total


def test_a_teacher_cached_with_the_whole_vocabulary_gives_the_exact_kl(tok) -> None:  # type: ignore[no-untyped-def]
    model = _perturbed(tok)
    anchors = _conversations(tok, 3, "general")
    teacher = TeacherCache.build(model, anchors, pad_token_id(tok), len(tok), labelled_logits)
    assert teacher.rest_mass() == 0.0
    for picks in ([0, 1, 2], [2, 0]):  # rows follow the batch's order, whatever the pick
        batch = collate([anchors[i] for i in picks], pad_token_id(tok))
        with torch.no_grad():
            cached, positions = anchor_kl(model, batch, teacher=teacher, picks=picks)
            exact, same = anchor_kl(model, batch)
        assert positions == same and float(exact) > 1e-3
        assert float(cached) == pytest.approx(float(exact), rel=1e-5)


def test_a_top_k_teacher_is_the_grouped_kl_zero_at_the_start_and_below_the_full_one(tok) -> None:  # type: ignore[no-untyped-def]
    anchors = _conversations(tok, 3, "general")
    batch = collate(anchors, pad_token_id(tok))
    fresh = lora_model(make_model(len(tok)), LORA)
    teacher = TeacherCache.build(fresh, anchors, pad_token_id(tok), 8, labelled_logits)
    with torch.no_grad():
        start, _ = anchor_kl(fresh, batch, teacher=teacher, picks=[0, 1, 2])
    assert abs(float(start)) < 1e-6
    assert 0.01 < teacher.rest_mass() < 1  # a random model spreads its mass: the rest is not empty
    model = _perturbed(tok)
    teacher = TeacherCache.build(model, anchors, pad_token_id(tok), 8, labelled_logits)
    with torch.no_grad():
        cached, _ = anchor_kl(model, batch, teacher=teacher, picks=[0, 1, 2])
        full, _ = anchor_kl(model, batch)
    assert float(cached) == pytest.approx(_grouped_reference_kl(model, batch, 8), rel=1e-4)
    assert 0 < float(cached) < float(full)


def test_training_with_a_whole_vocabulary_teacher_cache_matches_the_teacher_pass(tok) -> None:  # type: ignore[no-untyped-def]
    examples, anchors = _conversations(tok, 8, "company"), _conversations(tok, 4, "general")
    logs = {}
    for top_k in (0, len(tok)):
        torch.manual_seed(3)
        train = TrainSection(max_steps=4, batch_size=2, learning_rate=3e-2, warmup_steps=0, kl_weight=2.0,
                             kl_batch_size=2, kl_top_k=top_k, cache_frozen_prefix=False)
        _, logs[top_k] = train_lora(make_model(len(tok)), tok, examples, [], LORA, train, progress=False,
                                    anchor_examples=anchors)
    exact, cached = logs[0].rows, logs[len(tok)].rows
    assert "kl_teacher_s" in logs[len(tok)].setup and "kl_teacher_s" not in logs[0].setup
    assert exact[-1]["kl"] > 1e-4
    assert [r["kl"] for r in cached] == pytest.approx([r["kl"] for r in exact], rel=1e-4, abs=1e-7)
    assert [r["train_loss"] for r in cached] == pytest.approx([r["train_loss"] for r in exact], rel=1e-5)
