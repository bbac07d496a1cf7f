"""LoRA fine-tuning on a tiny Llama: the assistant-only loss mask, learning, determinism, the stage."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tests.unit.tiny_llm import make_model, make_tokenizer, save_tiny_model
from toolkit.buildsys.config import BuildConfig, LoraSection, TrainSection
from toolkit.buildsys.stage_api import StageContext, StageRecord
from toolkit.datasets.records import Example, write_jsonl
from toolkit.errors import StageError
from toolkit.model_io.modeling import load_tokenizer, pad_token_id, render_prompt_ids
from toolkit.stages import control as control_stage
from toolkit.stages import finetune as finetune_stage
from toolkit.training.examples import IGNORE_INDEX, TokenizedExample, build_examples, collate
from toolkit.training.lora import batch_stream, eval_loss, summed_loss, total_steps, train_lora

FAST_LORA = LoraSection(rank=4, alpha=8, dropout=0.0)


def _labelled_text(tok, example: TokenizedExample) -> list[str]:  # type: ignore[no-untyped-def]
    """The labelled tokens, decoded run by run (each run is one assistant reply)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        on = label != IGNORE_INDEX
        if on:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = on
    return [tok.decode(run) for run in runs]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return make_tokenizer()


def _reference_ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """`text` (a prompt rendered by hand) through the raw tokenizers library: no chat template, no transformers."""
    raw = Tokenizer.from_file(str(Path(tok.name_or_path) / "tokenizer.json"))
    return list(raw.encode(text, add_special_tokens=False).ids)


def _qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_only_assistant_reply_and_end_of_turn_are_labelled(tok) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}] + _qa("Hours?", "Open 9am to 6pm.")
    (example,) = build_examples(tok, messages, max_seq_len=512)
    assert _labelled_text(tok, example) == ["Open 9am to 6pm.<|im_end|>"]
    # The unlabelled prefix is exactly the ChatML prompt, and the one serving renders: training and serving agree.
    prompt = _reference_ids(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHours?<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    assert render_prompt_ids(tok, messages[:-1]) == prompt
    assert example.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])


def test_every_assistant_turn_is_labelled_in_a_multi_turn_chat(tok) -> None:  # type: ignore[no-untyped-def]
    messages = _qa("Hi", "Hello! How can I help?") + _qa("退货期限?", "三十天。")
    (example,) = build_examples(tok, messages, max_seq_len=512)
    assert _labelled_text(tok, example) == ["Hello! How can I help?<|im_end|>", "三十天。<|im_end|>"]


# Gemma 4's shape: the generation prompt opens an empty thought channel that a reply in the history does not show.
THOUGHT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think></think>' }}{% endif %}"
)


def test_a_template_that_renders_replies_apart_from_their_prompt_trains_each_reply_after_the_served_prompt() -> None:
    tok = make_tokenizer()  # its own: the module's `tok` keeps the plain ChatML template for the other tests
    tok.chat_template = THOUGHT_TEMPLATE
    messages = _qa("Hi", "Hello!") + _qa("Hours?", "9 to 6.")
    first, second = build_examples(tok, messages, max_seq_len=512)
    for example, upto, reply in ((first, 1, "Hello!"), (second, 3, "9 to 6.")):
        prompt = render_prompt_ids(tok, messages[:upto])  # what serving renders: with the open thought channel
        assert tok.decode(prompt).endswith("assistant\n<think></think>")
        assert example.input_ids[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
        assert _labelled_text(tok, example) == [f"{reply}<|im_end|>"]


def test_cut_short_reply_does_not_teach_stopping(tok) -> None:  # type: ignore[no-untyped-def]
    (example,) = build_examples(tok, _qa("Tips?", "First, sleep"), max_seq_len=512, train_eos=False)
    assert _labelled_text(tok, example) == ["First, sleep"]


def test_truncation_that_removes_every_reply_token_drops_the_example(tok) -> None:  # type: ignore[no-untyped-def]
    messages = _qa("A long question " * 20, "Short answer.")
    assert build_examples(tok, messages, max_seq_len=16) == []
    (kept,) = build_examples(tok, messages, max_seq_len=4096)
    assert len(kept.input_ids) > 16


def test_batches_cover_each_epoch_once_in_a_seeded_length_grouped_order() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(50)]
    stream = batch_stream(lengths, batch_size=4, seed=7, group=4)
    epoch = [next(stream) for _ in range(13)]  # 50 examples: 12 full batches and one of 2
    assert sorted(i for b in epoch for i in b) == list(range(50))
    again = batch_stream(lengths, batch_size=4, seed=7, group=4)
    assert [next(again) for _ in range(13)] == epoch
    other = batch_stream(lengths, batch_size=4, seed=8, group=4)
    assert [next(other) for _ in range(13)] != epoch
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in epoch)
    ungrouped = sum(max(lengths[i] for i in range(s, min(s + 4, 50))) * len(range(s, min(s + 4, 50)))
                    - sum(lengths[s: s + 4]) for s in range(0, 50, 4))
    assert padding < ungrouped / 2  # similar lengths share a batch


def test_steps_from_epochs() -> None:
    assert total_steps(TrainSection(max_steps=None, epochs=2.0, batch_size=4, grad_accum=2), 20) == 5
    assert total_steps(TrainSection(max_steps=7), 1000) == 7


def _examples(tok, n: int = 16) -> list[TokenizedExample]:  # type: ignore[no-untyped-def]
    facts = ["two-year warranty", "open 9am to 6pm", "Paris", "三十天"]
    out = []
    for i in range(n):
        (ex,) = build_examples(tok, _qa(f"Question {i}?", f"Answer: {facts[i % len(facts)]}."), 256)
        out.append(ex)
    return out


def _train(tok, seed: int, steps: int = 12, scheduler: str = "cosine", lr: float = 5e-3):  # type: ignore[no-untyped-def]
    train = TrainSection(max_steps=steps, batch_size=4, grad_accum=2, learning_rate=lr, warmup_steps=2,
                         eval_every=5, seed=seed, lr_scheduler=scheduler)  # type: ignore[arg-type]
    model = make_model(len(tok))
    return train_lora(model, tok, _examples(tok), _examples(tok, 4), FAST_LORA, train, progress=False)


def test_training_reduces_loss(tok) -> None:  # type: ignore[no-untyped-def]
    data = _examples(tok)
    before = eval_loss(make_model(len(tok)), data, pad_id=2, batch_size=8)
    model, log = _train(tok, seed=1, steps=15, lr=3e-2)
    after = eval_loss(model, data, pad_id=2, batch_size=8)
    assert before is not None and after is not None
    assert after < before * 0.7
    assert log.rows[-1]["train_loss"] < log.rows[0]["train_loss"]
    assert [r["step"] for r in log.rows if r.get("val_loss") is not None] == [5, 10, 15]


def _lora_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_same_seed_gives_identical_adapters(tok) -> None:  # type: ignore[no-untyped-def]
    first, log_a = _train(tok, seed=3, steps=4)
    second, log_b = _train(tok, seed=3, steps=4)
    other, _ = _train(tok, seed=4, steps=4)
    a, b, c = _lora_state(first), _lora_state(second), _lora_state(other)
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in log_a.rows] == [r["train_loss"] for r in log_b.rows]
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("scheduler", ["linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(tok, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    _, log = _train(tok, seed=1, steps=6, scheduler=scheduler)
    lrs = [r["lr"] for r in log.rows]
    assert lrs[0] < lrs[1]  # warmup
    if scheduler == "constant":
        assert lrs[2:] == [5e-3] * 4
    else:
        assert lrs[-1] < lrs[2]


def test_no_training_examples_is_a_clear_error(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StageError, match="no training examples"):
        train_lora(make_model(len(tok)), tok, [], [], FAST_LORA, TrainSection(max_steps=1), progress=False)


def _data_record(tmp_path: Path) -> StageRecord:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [Example(messages=_qa(f"Warranty {i}?", "Two years."), facts=["Two years"], source=f"x:{i}")
            for i in range(8)]
    for split in ("train", "val", "test"):
        write_jsonl(data_dir / f"{split}.jsonl", rows[:4] if split != "train" else rows)
    artifacts = {s: f"{s}.jsonl" for s in ("train", "val", "test")}
    return StageRecord("data", data_dir, "k", "d", {}, artifacts, {})


def test_stage_saves_adapter_template_and_loss_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = save_tiny_model(tmp_path / "base" / "model")
    monkeypatch.setattr(control_stage, "load_control_prompts", lambda: ["What is the capital of France?"] * 3)
    config = BuildConfig.model_validate({
        "workspace": str(tmp_path),
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2, "control_examples": 2},
    })
    base_record = StageRecord("base_model", base.parent, "k", "d", {}, {"model": "model"}, {})
    control_dir = tmp_path / "control"
    control_dir.mkdir()
    distilled = control_stage.run(
        StageContext(config=config, out_dir=control_dir, inputs={"base_model": base_record}, workspace=tmp_path)
    )
    control = [json.loads(line) for line in (control_dir / "control.jsonl").read_text().splitlines()]
    # A random model may answer with nothing (empty replies are dropped), never with more than asked.
    assert len(control) == distilled.metrics["control_examples"] <= 2
    inputs = {
        "base_model": base_record,
        "data": _data_record(tmp_path),
        "control": StageRecord("control", control_dir, "k", "d", {}, distilled.artifacts, {}),
    }
    out = tmp_path / "out"
    out.mkdir()
    result = finetune_stage.run(StageContext(config=config, out_dir=out, inputs=inputs, workspace=tmp_path))

    adapter = out / result.artifacts["adapter"]
    template = (adapter / "chat_template.jinja").read_text()
    assert template == load_tokenizer(base).chat_template
    assert result.metrics["chat_template_sha256"] == hashlib.sha256(template.encode("utf-8")).hexdigest()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it trained
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[1]["val_loss"] and not rows[0]["val_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["control_examples"] == len(control)
    assert result.metrics["train_examples"] == 8 + len(control) and result.metrics["steps"] == 3


def test_self_distill_keeps_finished_and_cut_replies_and_drops_empty_ones(
    tok, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    cap = control_stage.CONTROL_MAX_NEW_TOKENS
    paris = tok("Paris is the capital of France.").input_ids
    long_reply = (tok(" two-year warranty").input_ids * cap)[:cap]
    seen: list[list[int]] = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size):  # type: ignore[no-untyped-def]
        seen.extend(prompts)
        return [paris, long_reply, []]

    monkeypatch.setattr(control_stage, "greedy_generate", fake_generate)
    prompts = ["What is the capital of France?", "Tell me about warranties.", "Say nothing.", "Unused."]
    control = control_stage.self_distill(None, tok, prompts, count=3)
    assert seen[0] == _reference_ids(tok, "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
                                          f"<|im_start|>user\n{prompts[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert [c.finished for c in control] == [True, False]
    assert control[0].messages[-1] == {"role": "assistant", "content": "Paris is the capital of France."}


def test_layers_fraction_adapts_only_the_top_layers_and_stops_the_backward_there(tok) -> None:  # type: ignore[no-untyped-def]
    from toolkit.training.lora import lora_model, summed_loss

    model = make_model(len(tok))
    n_layers = model.config.num_hidden_layers
    assert n_layers >= 2
    peft_model = lora_model(model, LoraSection(rank=4, alpha=8, dropout=0.0, layers_fraction=0.5))
    adapted = {int(name.split("layers.")[1].split(".")[0]) for name, _ in peft_model.named_parameters()
               if "lora_" in name}
    top = max(1, round(n_layers * 0.5))
    assert adapted == set(range(n_layers - top, n_layers))
    # every linear layer kind of the adapted layers, as with "all-linear", not only attention
    kinds = {name.split(".")[-4] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert {"q_proj", "v_proj", "down_proj"} <= kinds

    batch = collate([TokenizedExample([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8])], pad_id=2)
    hidden_in: list[torch.Tensor] = []
    first_adapted = peft_model.get_base_model().model.layers[n_layers - top]
    first_adapted.register_forward_hook(
        lambda _m, args, kwargs, _out: hidden_in.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    loss, _ = summed_loss(peft_model, batch)
    loss.backward()
    assert not hidden_in[0].requires_grad  # nothing below the adapted layers is on the autograd tape


def test_bf16_precision_trains_and_keeps_fp32_adapters(tok) -> None:  # type: ignore[no-untyped-def]
    train = TrainSection(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_steps=0, precision="bf16")
    model, log = train_lora(make_model(len(tok)), tok, _examples(tok), [], FAST_LORA, train, progress=False)
    assert all(v.dtype == torch.float32 for v in _lora_state(model).values())
    assert len(log.rows) == 3 and all(math.isfinite(r["train_loss"]) for r in log.rows)  # no NaN, no inf


def test_auto_precision_and_device_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.errors import ConfigError
    from toolkit.training.device import Precision, resolve_device

    cpu = torch.device("cpu")
    monkeypatch.setattr("toolkit.training.device.cpu_has_amx", lambda: False)
    assert Precision.choose(cpu, "auto").dtype is None  # bf16 autocast without AMX is slower than fp32
    monkeypatch.setattr("toolkit.training.device.cpu_has_amx", lambda: True)
    assert Precision.choose(cpu, "auto").dtype == torch.bfloat16
    assert Precision.choose(cpu, "fp32").dtype is None and not Precision.choose(cpu, "bf16").scaler
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_fine_tune_on_cuda_lowers_the_loss(tok) -> None:  # type: ignore[no-untyped-def]
    """The tiny model on the GPU: mixed precision, gradient checkpointing, adapters back on the CPU."""
    train = TrainSection(max_steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=0, device="cuda",
                         gradient_checkpointing=True)
    model, log = train_lora(make_model(len(tok)), tok, _examples(tok), [], FAST_LORA, train, progress=False)
    assert log.setup["device"].startswith("cuda") and log.setup["precision"] in ("bfloat16", "float16")
    first, last = log.rows[0]["train_loss"], log.rows[-1]["train_loss"]
    assert last < first * 0.8, (first, last)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in _lora_state(model).values())


def test_frozen_prefix_cache_gives_the_same_loss_and_gradients(tok) -> None:  # type: ignore[no-untyped-def]
    from toolkit.training.frozen_prefix import FrozenPrefix
    from toolkit.training.lora import lora_model

    torch.manual_seed(0)
    lora = LoraSection(rank=4, alpha=8, dropout=0.0, layers_fraction=0.5)  # the 2-layer model: layer 1 adapted
    model = lora_model(make_model(len(tok)), lora)
    model.train()
    examples = _examples(tok, 6)
    prefix = FrozenPrefix.build(model, [e.input_ids for e in examples], 4, torch.autocast("cpu", enabled=False))
    assert prefix is not None and prefix.first == 1
    batch = collate(examples[1:4], pad_token_id(tok))

    def loss_and_grads(**cache: object) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss, _ = summed_loss(model, batch, **cache)  # type: ignore[arg-type]
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = loss_and_grads()
    cached, cached_grads = loss_and_grads(prefix=prefix, indices=[1, 2, 3])
    assert cached == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=1e-5), name
    assert len(list(model.get_base_model().get_decoder().layers)) == 2  # the layer list is restored
