"""Every exit's prediction for every example, in one full-depth pass.

Rules that only read exit outputs (entropy, confidence, patience, the policy, the oracle) can be
simulated exactly from these tables, and memorized layers are read off them too.

One table class: :class:`consistentee.evaluation.sweep.EvalTables`, the evaluation view of the same signals, is an
:class:`ExitTables` that requires labels (checked when it is built), is built positionally in its own field order
(its callers' contract) and adds the full-depth metrics of :mod:`consistentee.evaluation.metrics`, a layer above
this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from consistentee.exits.rules import exit_probability, exit_softmax


@dataclass
class ExitTables:
    #: [N, L, C] softmax of every exit.
    probs: torch.Tensor
    #: [N, L-1] exit probability p_l of every policy (None: the tables of a model whose policies are not read).
    policy_probs: torch.Tensor | None
    #: [N] gold label ids, or None when the split has no labels.
    labels: torch.Tensor | None
    #: [N] number of real tokens of each example (for FLOPs).
    seq_lens: torch.Tensor
    #: [N, L, d] pooled state after every layer (only when collected with ``return_pooled=True``).
    pooled: torch.Tensor | None = None
    #: [N, L] scores of learned exit heads (BERxiT), when they were scored on the pooled states.
    learned_scores: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]

    def __len__(self) -> int:
        return self.probs.shape[0]

    def predictions(self) -> torch.Tensor:
        """[N, L] argmax of every exit."""
        return self.probs.argmax(dim=-1)

    def correct(self) -> torch.Tensor:
        """[N, L] float: 1 where exit l's argmax is the gold label."""
        if self.labels is None:
            raise ValueError("the split has no labels")
        return (self.predictions() == self.labels.unsqueeze(1)).float()

    def per_exit_accuracy(self) -> list[float]:
        return self.correct().mean(dim=0).tolist()


@torch.inference_mode()
def collect_exit_tables(
    model,
    dataset: Dataset,
    collate,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "exits",
    return_pooled: bool = False,
) -> ExitTables:
    """Run ``model`` at full depth over ``dataset`` in eval mode; row i of the tables is the dataset's item i
    (also for a ``Subset``); with ``return_pooled`` also keep the pooled state after every layer (what learned
    exit heads train on)."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    probs = policy = labels = pooled = None
    seq_lens = torch.zeros(n, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    start = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
        index = torch.arange(start, start + batch["input_ids"].shape[0])
        start += len(index)
        out = model(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["token_type_ids"].to(device) if "token_type_ids" in batch else None,
            return_pooled=return_pooled,
        )
        p = exit_softmax(out.exit_logits).cpu()
        q = exit_probability(out.policy_logits).cpu()
        if probs is None:
            probs = torch.zeros(n, *p.shape[1:], dtype=p.dtype)
            policy = torch.zeros(n, q.shape[1], dtype=q.dtype)
            if "labels" in batch:
                labels = torch.full((n,), -1, dtype=torch.long)
            if return_pooled:
                pooled = torch.zeros(n, *out.pooled.shape[1:])
        probs[index], policy[index] = p, q
        if return_pooled:
            pooled[index] = out.pooled.float().cpu()
        seq_lens[index] = batch["attention_mask"].sum(1).cpu()
        if labels is not None:
            labels[index] = batch["labels"]
    model.train(was_training)
    if probs is None:
        raise ValueError("cannot evaluate an empty split")
    return ExitTables(probs=probs, policy_probs=policy, labels=labels, seq_lens=seq_lens, pooled=pooled)
