"""LoRA fine-tuning: a plain seeded torch loop over assistant-only labels, loss curve output.

A plain loop rather than ``transformers.Trainer``: the whole job is ~60 small CPU steps, and the
loop keeps every piece the build promises visible in one place (the label mask, a deterministic
data order, token-weighted gradient accumulation, eval on a fixed schedule) without Trainer's
accelerate/dataloader machinery, which adds start-up time and nondeterminism knobs to pin down.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.buildsys.buildlog import progress as progress_bar
from toolkit.buildsys.config import LoraSection, TrainSection
from toolkit.errors import StageError
from toolkit.model_io.modeling import pad_token_id
from toolkit.training.device import Precision, resolve_device
from toolkit.training.examples import IGNORE_INDEX, TokenizedExample, collate
from toolkit.training.frozen_prefix import FrozenPrefix
from toolkit.training.teacher import TeacherCache, sparse_kl

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def labelled_logits(
    model: Any, batch: dict[str, torch.Tensor], prefix: FrozenPrefix | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output head's float logits at the positions that predict a label, and those labels.

    The head runs only there: with a 49k vocabulary it is a large share of a small model's compute,
    and most positions (system/user/template) have none. With a frozen-prefix cache (and the batch's
    example `indices` into it), the decoder starts at the first adapted layer from the cached states.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(core.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if prefix is not None and indices is not None:
        hidden = prefix.hidden(indices, batch["attention_mask"])
    else:
        hidden = core.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return core.get_output_embeddings()(hidden[:, :-1, :][keep]).float(), targets[keep]


def summed_loss(
    model: Any, batch: dict[str, torch.Tensor], prefix: FrozenPrefix | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and how many there were."""
    import torch.nn.functional as F  # noqa: N812 - the conventional alias

    logits, targets = labelled_logits(model, batch, prefix, indices)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def anchor_kl(
    model: Any, batch: dict[str, torch.Tensor], prefix: FrozenPrefix | None = None,
    indices: Sequence[int] | None = None, teacher: TeacherCache | None = None, picks: Sequence[int] = (),
) -> tuple[torch.Tensor, int]:
    """Sum over labelled positions of KL(base || adapted) between next-token distributions, and the count.

    The teacher is the same model with its adapters disabled (PEFT's ``disable_adapter``): the frozen
    base costs one extra forward pass without gradients, not a second copy of the weights. With a
    frozen-prefix cache both passes start from the cached hidden states (the layers below the adapters
    are the base model's either way). With `teacher` (its rows for anchor examples `picks`) that pass
    was made once before training, and the divergence is the top-k one of :mod:`toolkit.training.teacher`.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - the conventional alias

    logits, targets = labelled_logits(model, batch, prefix, indices)
    if teacher is not None:
        return sparse_kl(logits, *teacher.rows(picks, logits.device)), int(targets.numel())
    student = F.log_softmax(logits, dim=-1)
    with torch.no_grad(), model.disable_adapter():
        base = F.log_softmax(labelled_logits(model, batch, prefix, indices)[0], dim=-1)
    kl = F.kl_div(student, base, log_target=True, reduction="sum")
    return kl, int(targets.numel())


def eval_loss(model: Any, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int) -> float | None:
    """Mean per-token loss on `examples` (no dropout, no gradients)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            loss, n = summed_loss(model, collate(examples[start: start + batch_size], pad_id))
            total, tokens = total + float(loss), tokens + n
    model.train(was_training)
    return total / max(tokens, 1)


def batch_stream(lengths: Sequence[int], batch_size: int, seed: int, group: int = 8) -> Iterator[list[int]]:
    """Endless example-index batches, the same on every run for a given seed.

    Each epoch draws a seeded permutation, cuts it into windows of `group` batches, sorts each
    window by length and cuts it into batches, then shuffles the batch order: examples of similar
    length share a batch, so little compute goes to padding, while the order stays random.
    """
    import torch

    epoch = 0
    n = len(lengths)
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        batches: list[list[int]] = []
        window = batch_size * group
        for start in range(0, n, window):
            chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
            batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[b]
        epoch += 1


def total_steps(train: TrainSection, n_examples: int) -> int:
    """Optimizer steps: max_steps when set, else enough for `epochs` passes over the data."""
    if train.max_steps is not None:
        return train.max_steps
    per_step = train.batch_size * train.grad_accum
    return max(1, math.ceil(train.epochs * n_examples / per_step))


def make_scheduler(optimizer: Any, train: TrainSection, steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=min(train.warmup_steps, steps),
                         num_training_steps=steps)


def linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers below the output head (PEFT's "all-linear" set)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    })


def lora_model(model: Any, lora: LoraSection) -> Any:
    """Wrap `model` with fresh LoRA adapters (initialised from torch's seeded RNG).

    With `lora.layers_fraction` < 1, only the top decoder layers get adapters: nothing below the lowest
    one needs a gradient, so autograd stops there and a training step skips that part of the backward.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets: str | list[str] = lora.target_modules
    layers: list[int] | None = None
    if lora.layers_fraction < 1:
        n_layers = int(model.config.num_hidden_layers)
        top = max(1, round(n_layers * lora.layers_fraction))
        layers = list(range(n_layers - top, n_layers))
        if targets == "all-linear":  # PEFT refuses layers_to_transform with the "all-linear" shorthand
            targets = linear_module_names(model)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        layers_to_transform=layers, bias="none", task_type=TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"lora.target_modules: {err}") from err


@dataclass
class TrainLog:
    """The loss curve: one row per optimizer step, val loss where it was measured."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)  # device, precision, ... for the report

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", "train_loss", "val_loss", "val_fact_accuracy", "kl", "lr",
                                                    "elapsed_s"])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k, "") for k in writer.fieldnames})

    def write_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display on CI machines
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([r["step"] for r in self.rows], [r["train_loss"] for r in self.rows], label="train")
        val = [(r["step"], r["val_loss"]) for r in self.rows if r.get("val_loss") not in (None, "")]
        if val:
            ax.plot(*zip(*val, strict=True), marker="o", label="val")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (assistant tokens)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def probe_steps(fractions: Sequence[float], steps: int) -> set[int]:
    """The optimizer steps (1-based) at which the probes run."""
    return {min(steps, max(1, round(f * steps))) for f in fractions}


def neftune_hook(alpha: float) -> Callable[..., Any]:
    """A forward hook on the input embeddings that adds NEFTune noise while the model trains (Jain et al. 2023)."""
    import torch

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return hook


def train_lora(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[TokenizedExample],
    val_examples: Sequence[TokenizedExample],
    lora: LoraSection,
    train: TrainSection,
    *,
    progress: bool = True,
    probe: Callable[[Any], float] | None = None,
    anchor_examples: Sequence[TokenizedExample] = (),
) -> tuple[Any, TrainLog]:
    """Fine-tune `model` with LoRA; return the PEFT model and its loss log.

    Deterministic for a given seed on a given device: adapters are initialised and the data order
    drawn from seeded generators, and every optimizer step sees the same micro-batches. Runs on
    ``train.device``; the returned model is back on the CPU. `probe(model)` (the held-out val
    questions' fact accuracy) runs at ``train.probe_fractions``; with ``train.keep: best_probe`` the
    adapter weights of the best probe are restored at the end. With ``train.kl_weight`` > 0 every step
    also draws ``train.kl_batch_size`` of `anchor_examples` (general conversations) and adds
    ``kl_weight`` times the mean per-position KL(base || adapted) there (:func:`anchor_kl`).
    """
    import torch

    if not train_examples:
        raise StageError("no training examples with assistant tokens; check the dataset and data.max_seq_len")
    torch.manual_seed(train.seed)
    device = resolve_device(train.device)
    precision = Precision.choose(device, train.precision)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = lora_model(model, lora).to(device)
    peft_model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    if train.neftune_alpha > 0:
        peft_model.get_input_embeddings().register_forward_hook(neftune_hook(train.neftune_alpha))
    log.info("finetune on %s, %s autocast%s", device, precision.label,
             ", gradient checkpointing" if train.gradient_checkpointing else "")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    steps = total_steps(train, len(train_examples))
    scheduler = make_scheduler(optimizer, train, steps)
    pad = pad_token_id(tokenizer)
    stream = batch_stream([len(e.input_ids) for e in train_examples], train.batch_size, train.seed)
    probes = probe_steps(train.probe_fractions, steps) if probe is not None else set()
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    anchors = list(anchor_examples) if train.kl_weight > 0 else []
    anchor_stream = (batch_stream([len(e.input_ids) for e in anchors], train.kl_batch_size, train.seed + 1)
                     if anchors else None)
    prefix = None
    prefix_s = 0.0
    visits = steps * train.batch_size * train.grad_accum
    if train.cache_frozen_prefix and visits <= len(train_examples):
        # each example is seen at most once: computing the frozen layers for all of them first only adds work
        log.info("frozen-prefix cache skipped: %d steps visit %d examples of %d", steps, visits, len(train_examples))
    elif train.cache_frozen_prefix and train.neftune_alpha == 0:  # NEFTune noise must be fresh every step
        cache_started = time.perf_counter()
        prefix = FrozenPrefix.build(peft_model, [e.input_ids for e in [*train_examples, *anchors]], 32,
                                    precision.autocast())
        prefix_s = time.perf_counter() - cache_started
        if prefix is not None:
            log.info("frozen prefix: layers 0-%d cached for %d examples in %.1f s", prefix.first - 1,
                     len(train_examples), prefix_s)
    teacher = None
    if anchors and train.kl_top_k > 0:
        cache_started = time.perf_counter()
        teacher = TeacherCache.build(peft_model, anchors, pad, train.kl_top_k, labelled_logits, prefix,
                                     offset=len(train_examples), autocast=precision.autocast)
        teacher_s, rest_mass = time.perf_counter() - cache_started, teacher.rest_mass()
        log.info("KL teacher: top %d of the base model's log-probabilities on %d anchor conversations in %.1f s; "
                 "mean mass outside them %.4f", train.kl_top_k, len(anchors), teacher_s, rest_mass)
    log_ = TrainLog(setup={"device": str(device), "precision": precision.label,
                           "gradient_checkpointing": train.gradient_checkpointing,
                           "frozen_prefix_layers": prefix.first if prefix is not None else 0,
                           "frozen_prefix_s": round(prefix_s, 1) if prefix is not None else 0.0})
    if teacher is not None:
        log_.setup.update(kl_teacher_s=round(teacher_s, 1), kl_teacher_rest_mass=round(rest_mass, 5))
    spent = {"val_loss_s": 0.0, "probe_s": 0.0}
    started = time.perf_counter()
    bar = progress_bar(range(1, steps + 1), total=steps, desc="finetune", unit="step", enabled=progress)
    for step in bar:
        picks = [next(stream) for _ in range(train.grad_accum)]
        window = [collate([train_examples[i] for i in pick], pad) for pick in picks]
        window_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
        step_loss = 0.0
        for pick, batch in zip(picks, window, strict=True):
            with precision.autocast():
                loss, _ = summed_loss(peft_model, batch, prefix, pick)
            scaler.scale(loss / max(window_tokens, 1)).backward()
            step_loss += float(loss.detach())
        step_kl = None
        if anchor_stream is not None:
            pick = next(anchor_stream)
            with precision.autocast():
                kl, positions = anchor_kl(peft_model, collate([anchors[i] for i in pick], pad), prefix,
                                          [len(train_examples) + i for i in pick], teacher, pick)
            scaler.scale(train.kl_weight * kl / max(positions, 1)).backward()
            step_kl = float(kl.detach()) / max(positions, 1)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {
            "step": step, "train_loss": step_loss / max(window_tokens, 1),
            "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 2),
        }
        if step_kl is not None:
            row["kl"] = step_kl
        if step % train.eval_every == 0 or step == steps:
            timer = time.perf_counter()
            row["val_loss"] = eval_loss(peft_model, val_examples, pad, train.batch_size)
            spent["val_loss_s"] += time.perf_counter() - timer
        if step in probes and probe is not None:
            timer = time.perf_counter()
            peft_model.eval()
            row["val_fact_accuracy"] = accuracy = probe(peft_model)
            peft_model.train()
            spent["probe_s"] += time.perf_counter() - timer
            if train.keep == "best_probe" and (best is None or accuracy >= best[0]):
                best = (accuracy, step, {n: p.detach().clone() for n, p in peft_model.named_parameters()
                                         if p.requires_grad})
        log_.add(**row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                        **({"val": f"{row['val_loss']:.3f}"} if row.get("val_loss") is not None else {}))
    bar.close()
    log_.setup.update({k: round(v, 1) for k, v in spent.items()})
    if best is not None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name in best[2]:
                    param.copy_(best[2][name])
        log_.setup["kept_step"] = best[1]
        log_.setup["kept_val_fact_accuracy"] = best[0]
    peft_model.eval()
    if train.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return peft_model.to("cpu"), log_
