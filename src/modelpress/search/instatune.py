"""Super-network fine-tuning (InstaTune, BigNAS's sandwich rule) through the shared training loop.

Each step runs, on one batch, the largest sub-network, the smallest (its widths at their lowest, and its blocks
skipped where the space allows it) and ``n_random`` random ones, each once. The largest distils from the frozen
pretrained model, run in eval mode (label-free; the task's labels are mixed in by ``label_weight`` when there
are some); every other one distils *in place* from the largest's output of the same step (detached). The
super-network trains without dropout, so those in-place targets carry no dropout noise. With the TrainConfig's
``hidden_weight`` > 0 the largest also matches the frozen model's block outputs (hidden-state distillation,
:mod:`modelpress.train.distill`: the normalized MSE per block, the same loss as pruning's recovery); it runs
last in the step so that the loop's capture holds its block outputs. The budget is the
TrainConfig's (``steps`` and/or ``seconds``), with its checkpoints; the sub-network ordering is nested
(MatFormer-style: every sub-network takes the leading units of each group, ordered by saliency).
The loop is :func:`modelpress.train.train` (AdamW, schedule, checkpoints, resume, progress, seed): the student
is a module that runs the sandwich and concatenates the outputs along the batch, the teacher one that
concatenates the targets, and the task's loss is summed over the chunks. The random draws come from a
generator seeded by the seed and a step counter kept as a buffer of the student, so a resumed training
draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.graph.inputs import primary_output
from modelpress.graph.run import call_module
from modelpress.progress import QUIET, Reporter
from modelpress.search.supernet import SuperNet
from modelpress.train import TrainConfig, TrainResult, train


class _SandwichStudent(nn.Module):
    """Runs the sandwich inside the super-network, each sub-network once per step (the largest first, its output
    also the others' in-place target); outputs concatenated along the batch."""

    def __init__(self, net: SuperNet, n_random: int, seed: int) -> None:
        super().__init__()
        self.net_module = net.graph.module  # registered: its parameters are what the loop trains
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._net, self.n_random, self.seed = net, n_random, seed
        self._smallest = net.space.smallest(skip=True)

    def configs(self, draw: int) -> list[dict[str, Any]]:
        space = self._net.space
        rng = np.random.default_rng([self.seed, draw])
        return [space.largest(), self._smallest] + [space.random(rng) for _ in range(self.n_random)]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        configs = self.configs(int(self.draws))
        if self.training:
            self.draws += 1
        # the largest runs last: its block outputs are the ones the loop's hidden-state capture keeps (the
        # output order, largest first, is unchanged)
        outs: list[torch.Tensor] = [torch.empty(0)] * len(configs)
        for i in [*range(1, len(configs)), 0]:
            outs[i] = self._net.masked_module_call(configs[i], inputs)
        return torch.cat(outs, dim=0)


class _SandwichTeacher(nn.Module):
    """The frozen original model (run in eval mode by the loop): the largest sub-network's target."""

    def __init__(self, original: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.original, self.names = original, names

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return primary_output(call_module(self.original, inputs, self.names))


class _SandwichTask:
    """The task's loss summed over the sandwich's chunks: the largest against the frozen original, every other
    sub-network against the largest's output of the same step, detached (in-place distillation)."""

    def __init__(self, task: Any, n: int) -> None:
        self.task, self.n = task, n
        self.name = task.name

    def loss(self, student: torch.Tensor, teacher: torch.Tensor | None, batch: dict[str, torch.Tensor],
             **kw: Any) -> torch.Tensor:
        s_chunks = student.chunk(self.n, dim=0)
        largest = s_chunks[0].detach()
        total = s_chunks[0].new_zeros(())
        for i, s in enumerate(s_chunks):
            # only the largest sees the labels and the original; the others learn from the largest alone
            t = teacher if i == 0 else largest
            args = dict(kw) if i == 0 else {**kw, "label_weight": 0.0}
            total = total + self.task.loss(s, t, batch, **args)
        return total / self.n

    def loss_settings(self) -> dict[str, Any]:
        return {**self.task.loss_settings(), "sandwich": self.n}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def finetune_supernet(
    net: SuperNet,
    data: Any,
    *,
    task: Any,
    config: TrainConfig,
    n_random: int = 2,
    reference: nn.Module | None = None,
    resume: bool = False,
    reporter: Reporter = QUIET,
) -> TrainResult:
    """Fine-tune ``net``'s weights in place with the sandwich rule; see the module docstring.

    ``reference``: the frozen model the largest distils from (default: a copy of the super-network as it is
    now, i.e. the pretrained weights). ``config``: the training budget, optimizer, seed and checkpoints
    (``config.checkpoint_dir`` + ``resume=True`` continues an interrupted fine-tuning)."""
    names = list(net.graph.input_spec.names)
    original = reference if reference is not None else net.graph.copy().module
    for p in original.parameters():
        p.requires_grad_(False)
    student = _SandwichStudent(net, n_random, config.seed)
    teacher = _SandwichTeacher(original, names)
    sandwich = _SandwichTask(task, 2 + n_random)
    # no dropout: the largest's output, computed once per step, is a clean in-place target for the others
    config = config.model_copy(update={"dropout": False})
    hidden = None
    if config.hidden_weight > 0:  # the largest's blocks against the frozen original's (same paths)
        hidden = [(f"net_module.{b.path}", f"original.{b.path}") for b in net.graph.blocks]
    return train(student, data, task=sandwich, teacher=teacher, config=config, reporter=reporter,
                 input_names=names, resume=resume, hidden=hidden)
