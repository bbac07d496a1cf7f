"""The KL anchor's teacher, computed once: the base model's top-k next-token log-probabilities.

The anchor pulls the adapted model toward the base model on fixed general conversations. The base
model is the same model with its adapters disabled, and it never changes while LoRA trains: its
next-token distribution at each anchor position is the same at every step. So it is computed once,
before the first step, and kept sparsely: the k most likely tokens' log-probabilities and the total
probability of all the others. Each step then costs the student's pass only.

The divergence is taken on the partition {each of the teacher's top k tokens, the rest}:

    KL_k = sum_{i in top k} p_i (log p_i - log q_i) + P_rest (log P_rest - log Q_rest)

It is never above the full KL(p || q) (grouping outcomes can only lose information), equals it when
the teacher puts no mass outside its top k, and is zero exactly when the student matches the
teacher's top k and the rest's total. The build reports the mean mass outside the top k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolkit.training.examples import IGNORE_INDEX, TokenizedExample, collate

if TYPE_CHECKING:
    import torch

    from toolkit.training.frozen_prefix import FrozenPrefix

LabelledLogits = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class TeacherCache:
    """Per anchor example, in label order: top-k ids [n, k], their log-probabilities [n, k], log P(rest) [n]."""

    top_ids: list[torch.Tensor]
    top_logp: list[torch.Tensor]
    rest_logp: list[torch.Tensor]

    @classmethod
    def build(
        cls, model: Any, anchors: Sequence[TokenizedExample], pad_id: int, k: int, labelled_logits: LabelledLogits,
        prefix: FrozenPrefix | None = None, offset: int = 0, batch_size: int = 8,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> TeacherCache:
        """One pass of the base model (adapters disabled) over `anchors`; `offset` is their first index in
        `prefix`. `labelled_logits(model, batch, prefix, indices)` gives the head's logits at labelled positions."""
        import torch

        ids: list[torch.Tensor] = []
        logp: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []
        with torch.no_grad(), model.disable_adapter():
            for start in range(0, len(anchors), batch_size):
                chunk = anchors[start: start + batch_size]
                indices = [offset + start + i for i in range(len(chunk))]
                with autocast():
                    logits, _ = labelled_logits(model, collate(chunk, pad_id), prefix, indices)
                top_ids, top_logp, rest_logp = top_k_with_rest(torch.log_softmax(logits.float(), -1), k)
                counts = [sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in chunk]
                ids += list(top_ids.cpu().split(counts))
                logp += list(top_logp.cpu().split(counts))
                rest += list(rest_logp.cpu().split(counts))
        return cls(ids, logp, rest)

    def rows(self, picks: Sequence[int], device: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached rows of anchor examples `picks`, in the order their batch lists its labelled positions."""
        import torch

        return (torch.cat([self.top_ids[i] for i in picks]).to(device),
                torch.cat([self.top_logp[i] for i in picks]).to(device),
                torch.cat([self.rest_logp[i] for i in picks]).to(device))

    def rest_mass(self) -> float:
        """Mean teacher probability outside its top k, over every cached position."""
        import torch

        return float(torch.cat(self.rest_logp).exp().mean()) if self.rest_logp else 0.0


def top_k_with_rest(log_p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities of each row, their ids, and the log of the probability outside them."""
    top_logp, top_ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return top_ids, top_logp, _log_rest(log_p, top_ids)


def _log_rest(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, row by row, without cancellation (logsumexp of the rest)."""
    return log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)


def sparse_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
              rest_logp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL_k(teacher || student) (module docstring), differentiable in the student."""
    import torch

    log_q = torch.log_softmax(student_logits.float(), -1)
    kl = (top_logp.exp() * (top_logp - log_q.gather(-1, top_ids))).sum()
    rows = (rest_logp > float("-inf")).nonzero().squeeze(-1)  # where the teacher's top k hold everything: no term
    if rows.numel():  # (and no logsumexp over nothing, whose gradient is NaN)
        p_rest = rest_logp[rows].exp()
        kl = kl + (p_rest * (rest_logp[rows] - _log_rest(log_q[rows], top_ids[rows]))).sum()
    return kl
