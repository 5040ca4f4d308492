"""Dry runs: a group is offered as prunable only once removing its units was seen to keep the model running.

Tracing sees shapes, not the attributes a forward reads (a head count, split sizes, a head width computed
from the input width), so a group the propagation finds may still break the model when cut. Before groups
are offered, ``failing_groups`` removes a fraction of the units of every prunable group at once on a
module (restored afterwards) and runs it; if that fails, the module the error came from points to the suspects, a
bisection finds the failing group, which becomes fixed with the error as its reason, and the rest are
tried again. A model whose groups all pass costs one edit and one forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from modelpress.graph import edit as _edit
from modelpress.graph.groups import Group
from modelpress.graph.mapped import drop_mapped_weights

Runner = Callable[[nn.Module], torch.Tensor]  # runs a module on the example inputs, returns its primary output


def trial_units(group: Group, fraction: float) -> list[int]:
    """The units a dry run removes: ``fraction`` of them (at least one, never all), spread over the group."""
    k = min(group.size - 1, max(1, int(round(group.size * fraction))))
    return sorted({int(i) for i in np.linspace(0, group.size - 1, k).round()})


def innermost_module(exc: BaseException, root: nn.Module) -> str | None:
    """The path (in ``root``) of the innermost module whose code raised ``exc``; None if none did."""
    names = {id(m): n for n, m in root.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


class _Trial:
    """Removes units of groups from the module, runs it, and puts the module back as it was."""

    def __init__(self, module: nn.Module, run: Runner, fraction: float, shape: tuple[int, ...] | None) -> None:
        self.module = module
        self.run = run
        self.fraction = fraction
        if shape is None:
            with torch.no_grad():
                shape = tuple(run(module).shape)
        self.shape = shape
        self.count = 0

    def __call__(self, groups: list[Group]) -> tuple[str, str | None] | None:
        """None if the edited model runs with its output shape; else (reason, module path or None)."""
        self.count += 1
        saved = _edit.snapshot(self.module)
        try:
            _edit.remove_units(self.module, [(g, trial_units(g, self.fraction)) for g in groups])
            with torch.no_grad():
                shape = tuple(self.run(self.module).shape)
        except Exception as exc:  # any failure of the edited model is the finding
            where = innermost_module(exc, self.module)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return f"{type(exc).__name__}: {first}" + (f" (in {where})" if where else ""), where
        finally:
            _edit.restore(saved)
            drop_mapped_weights(self.module)  # the removal read the kept units of mapped weights: off again
        if shape != self.shape:
            return f"changes the output shape {self.shape} -> {shape}", None
        return None


def structure(group: Group, root: nn.Module) -> tuple:
    """What makes two groups alike: kind, the class of the module at their scope, their slots relative to it."""
    try:
        owner = type(root.get_submodule(group.scope)).__qualname__ if group.scope else type(root).__qualname__
    except AttributeError:
        owner = ""
    cut = len(group.scope) + 1 if group.scope else 0
    return group.kind, owner, tuple((p[cut:], a) for p, a in group.slots)


def _closeness(group: Group, where: str | None) -> tuple[int, int]:
    a, b = (where or "").split("."), group.scope.split(".") if group.scope else []
    common = len(os.path.commonprefix([a, b]))
    return common, -abs(len(a) - len(b))


def failing_groups(
    module: nn.Module, groups: list[Group], run: Runner, fraction: float = 0.3, shape: tuple[int, ...] | None = None
) -> dict[str, str]:
    """Name -> reason for each prunable group whose removal (``fraction`` of its units) breaks ``module``.

    ``module`` is edited and restored in place (no copy). The groups that pass are checked together
    too: removing units of all of them at once runs. When a group fails, the groups of the same
    structure (``structure``) are tried together and fixed together if they fail: one dry run per kind
    of failure, not per group.
    """
    pending = [g for g in groups if g.prunable]
    if not pending:
        return {}
    trial = _Trial(module, run, fraction, shape)
    failed: dict[str, str] = {}
    while pending:
        outcome = trial(pending)
        if outcome is None:
            break
        culprit = _culprit(trial, pending, outcome[1])
        if culprit is None:  # only a combination fails: fix them all rather than offer a broken cut
            failed.update({g.name: outcome[0] for g in pending})
            break
        bad, reason = culprit
        failed[bad.name] = reason
        kind = structure(bad, module)
        alike = [g for g in pending if g is not bad and structure(g, module) == kind]
        if alike and trial(alike) is not None:
            failed.update({g.name: f"{reason} [found on {bad.name}, same structure]" for g in alike})
        else:
            alike = []
        pending = [g for g in pending if g is not bad and g not in alike]
    return failed


def _culprit(trial: _Trial, pending: list[Group], where: str | None) -> tuple[Group, str] | None:
    """A failing group: the groups nearest the module that raised first, else a bisection."""
    near = sorted((g for g in pending if _related(g, where)), key=lambda g: _closeness(g, where), reverse=True)
    for g in near[:2]:
        outcome = trial([g])
        if outcome is not None:
            return g, outcome[0]
    return _find_one(trial, pending)


def _related(group: Group, where: str | None) -> bool:
    if not where or not group.scope:
        return True
    return where == group.scope or where.startswith(group.scope + ".") or group.scope.startswith(where + ".")


def _find_one(trial: _Trial, suspects: list[Group]) -> tuple[Group, str] | None:
    """Bisection for one group that fails (beside halves that passed), given that ``suspects`` fail together."""
    base: list[Group] = []
    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        if trial(base + half) is not None:
            suspects = half
        else:
            base += half
            suspects = suspects[len(half) :]
    outcome = trial(base + suspects)
    return (suspects[0], outcome[0]) if outcome is not None else None


def mark_fixed(groups: list[Group], failed: dict[str, str]) -> None:
    """Make each failing group fixed, its dry-run error as the reason (shown by ``modelpress inspect``)."""
    for g in groups:
        if g.name in failed:
            g.prunable = False
            g.meta["fixed"] = True
            g.meta["dry_run"] = failed[g.name]
            g.reason = f"removing units breaks the model: {failed[g.name]}"


__all__ = ["failing_groups", "innermost_module", "mark_fixed", "trial_units"]
