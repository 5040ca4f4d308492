"""Loss-aware GPTQ of a tied embedding / LM head: each row's Hessian adds what its embedding lookups cost.

GPTQ on the head's inputs minimises the head's output error ``e_r^T H e_r`` per row ``r`` (``H = X^T X / n``
over the head's input rows, shared by every row). A tied pair's codes also serve the embedding lookups, and
on the 22M stdlib Llama at 4 bits those cost most of what is left (next-token KL 2.0e-4, against 2.6e-5 with
the embedding kept float). Both errors, written in the same unit (the loss, to second order):

* the head: logit ``r`` moves by ``e_r . x``; the softmax Fisher's diagonal weighs it by ``p_r (1 - p_r)``,
  so row ``r`` costs ``sum_t p_r(t) (1 - p_r(t)) (e_r . x_t)^2 ~ m_r e_r^T H e_r`` with ``m_r`` the sum over
  calibration positions of ``p_r (1 - p_r)`` (its predicted mass);
* the embedding: every position ``t`` whose input token is ``r`` reads ``w_r + e_r``; the loss moves by
  ``e_r^T F_t e_r`` with ``F_t`` the Fisher of the model's output with respect to that position's embedding
  output (``g g^T``, ``g`` the gradient of the log-likelihood of tokens sampled from the model itself), so
  row ``r`` costs ``~ c_r e_r^T S e_r``, ``c_r`` its look-ups and ``S`` the mean of ``g g^T`` over positions.

Row ``r``'s Hessian is then ``H + rho_r S`` with ``rho_r = c_r / m_r``. GPTQ treats rows independently given
their Hessian, so rows are bucketed by ``rho`` (rows never looked up: ``H`` alone; the rest by quantiles of
``rho``, each bucket at its median) and each bucket is one GPTQ call on its rows.
Measured (stdlib Llama, 4-bit pair, block 32, 64 held-out windows of 128 tokens): ``quantize_weights`` KL
2.0e-4 -> 8.8e-5 (the trained 1M GPT-2: 2.4e-4 -> 6.7e-5); in a variant study outside the repository, 1 bucket
9.4e-5, 16 buckets 9.1e-5, and ``S`` replaced by its isotropic part 2.4e-4: the direction of the embedding's
sensitivity is what matters. ``S`` costs one forward and backward
of the float model per calibration batch (no parameter gradients), before any block is quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.graph.mapped import dropped_after_use
from modelpress.graph.run import as_tensors, call_module, primary_output

__all__ = ["RowUse", "row_hessians", "row_use"]

_CHUNK = 256  # positions whose softmax over the vocabulary is formed at once


@dataclass
class RowUse:
    """How a tied pair's rows are used on the calibration positions: ``fisher`` ``[D, D]`` the sum of ``g g^T``
    of the embedding output, ``lookups`` ``[V]`` each row's look-ups, ``mass`` ``[V]`` the sum of
    ``p_r (1 - p_r)`` (float64), ``positions`` the positions summed."""

    fisher: torch.Tensor
    lookups: torch.Tensor
    mass: torch.Tensor
    positions: int

    def rho(self) -> torch.Tensor:
        """Per row, the embedding's weight against the head's: ``lookups / mass`` (0 for rows never looked up)."""
        return self.lookups / self.mass.clamp_min(1e-12)


def row_use(model: nn.Module, embedding: nn.Module, batches: Sequence[Mapping[str, Any]], seed: int = 0,
            ) -> RowUse | None:
    """The statistics of :class:`RowUse` from one forward and backward of ``model`` per batch (no parameter
    gradients). None when they cannot be formed: batches without ``input_ids``, or a primary output that is
    not logits over the embedding's rows."""
    vocab = embedding.weight.shape[0]
    dim = embedding.weight.shape[1]
    fisher = torch.zeros(dim, dim, dtype=torch.float64)
    lookups = torch.zeros(vocab, dtype=torch.float64)
    mass = torch.zeros(vocab, dtype=torch.float64)
    positions = 0
    gen: torch.Generator | None = None  # on the logits' device, seeded at the first batch
    like = next(model.parameters(), None)
    was = model.training
    model.eval()
    try:
        with dropped_after_use(model):
            for batch in batches:
                if not isinstance(batch, Mapping) or "input_ids" not in batch:
                    return None
                fed = as_tensors(batch, [k for k in batch if k != "labels"], like)
                ids = fed["input_ids"]
                valid = fed["attention_mask"] > 0 if "attention_mask" in fed else torch.ones_like(ids, dtype=torch.bool)
                with _grad_of_output(embedding) as box, torch.enable_grad():
                    logits = primary_output(call_module(model, fed, list(fed)))
                    if logits.shape[:-1] != ids.shape or logits.shape[-1] != vocab:
                        return None
                    # d/dlogits of sum_t log p_t(y_t), y_t drawn from p_t: onehot(y) - p, formed without a
                    # float64 [positions, vocab] copy (a 128k vocabulary makes that gigabytes)
                    grad = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
                    flat, gflat = logits.detach().reshape(-1, vocab), grad.view(-1, vocab)
                    where = valid.reshape(-1).nonzero().flatten()
                    if gen is None:
                        gen = torch.Generator(device=logits.device).manual_seed(seed)
                    for chunk in where.split(_CHUNK):
                        p = torch.softmax(flat[chunk].float(), -1)
                        mass += (p * (1 - p)).sum(0).double().cpu()
                        y = torch.multinomial(p, 1, generator=gen).flatten()
                        p[torch.arange(len(chunk), device=p.device), y] -= 1.0
                        gflat[chunk] = -p
                    (g,) = torch.autograd.grad(logits, box["out"], grad.to(logits.dtype))
                    del grad, logits
                g = g.detach()[valid].double().cpu()  # statistics on the CPU, wherever the model runs
                fisher += g.t() @ g
                lookups.index_add_(0, ids[valid].reshape(-1).cpu(), torch.ones(int(valid.sum()), dtype=torch.float64))
                positions += int(valid.sum())
    finally:
        model.train(was)
    return RowUse(fisher, lookups, mass, positions) if positions else None


@contextlib.contextmanager
def _grad_of_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, ``module``'s output requires a gradient and is kept in the yielded ``box["out"]``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        box["out"] = out.detach().requires_grad_(True)
        return box["out"]

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def row_hessians(h: torch.Tensor, use: RowUse, buckets: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, Hessian) for GPTQ: rows never looked up get ``h``; the others, in ``buckets`` quantile buckets of
    ``rho``, get ``h + median(rho) S`` with ``S = fisher / positions`` (``h`` the head's ``X^T X / n``)."""
    rho = use.rho()
    seen = use.lookups > 0
    if (~seen).any():
        yield ~seen, h
    if not seen.any():
        return
    s = use.fisher.to(h.device, h.dtype) / use.positions
    edges = torch.quantile(rho[seen], torch.linspace(0, 1, buckets + 1, dtype=rho.dtype))
    taken = torch.zeros_like(seen)
    for i in range(buckets):
        rows = seen & ~taken & (rho <= edges[i + 1] if i < buckets - 1 else seen)
        if rows.any():
            taken |= rows
            yield rows, h + float(rho[rows].median()) * s
