"""The flow: transport maps for every space of one model, in an order where each cost sees the maps of
the groups its tensors also touch.

Weight costs: the residual stream first (from its own entries: embeddings, norms), then heads, MLPs and
conv channels in graph order (their rows and columns read and write the now-aligned stream), then a
second round in which the stream's cost also sees the branches (policy ``mean`` / ``weighted``) and every
group is aligned again against the refined stream. Activation costs need no order: one round.

Attention (QK modes): ``separate`` aligns the cells of the queries, keys and values with three maps (the
output projection takes the values' map), ``shared`` one map for queries and keys together and one for
the values, ``per-head`` keeps heads whole: heads are matched first (the cost of two heads is the optimal
cost of matching their dimensions), then the dimensions within each matched pair, one map for q, k, v
and the output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from modelpress.fuse.maps import Map
from modelpress.fuse.spaces import Space
from modelpress.fuse.transport import cost_value, couple, distances

QK_MODES = ("separate", "shared", "per-head")
Features = Callable[[Space, list, dict, str], dict[str, np.ndarray]]


class Settings(Protocol):
    """What alignment reads of the fusion settings (``modelpress.fuse.FusionSettings``)."""

    alignment: str
    reg: float
    qk: str


def role_features(space: Space, feats: dict[str, np.ndarray], qk: str) -> dict[str, np.ndarray]:
    """Features per map role for ``qk`` (see the module); non-attention spaces have one role, ``all``."""
    every = np.concatenate([feats[r] for r in sorted(feats)], 1)
    if space.kind != "head" or not space.head_dim or qk == "per-head" or not {"q", "k", "v"} <= set(feats):
        return {"all": every}
    if qk == "shared":
        return {"qk": np.concatenate([feats["q"], feats["k"]], 1), "v": feats["v"]}
    return {"q": feats["q"], "k": feats["k"], "v": feats["v"]}


def order(spaces: list[Space]) -> list[Space]:
    """The residual stream (embedding spaces) first, then the rest in graph order; fixed spaces left out."""
    live = [s for s in spaces if not s.fixed]
    return [s for s in live if s.kind == "embedding"] + [s for s in live if s.kind != "embedding"]


def rounds(cost: str, spaces: list[Space]) -> int:
    return 2 if cost == "weights" and any(s.kind == "embedding" and not s.fixed for s in spaces) else 1


def plan(space: Space, src: dict[str, np.ndarray], tgt: dict[str, np.ndarray], target: Space,
         settings: Settings) -> Map:
    """The map of one space from source features to target features, per role."""
    couplings = {}
    for role, x in src.items():
        y = tgt[role]
        if space.kind == "head" and space.head_dim and settings.qk == "per-head":
            couplings[role] = per_head(distances(x, y), space.heads, target.heads, space.head_dim,
                                       settings.alignment, settings.reg)
        else:
            couplings[role] = couple(distances(x, y), settings.alignment, settings.reg)
    return Map(couplings)


def per_head(cost: np.ndarray, n: int, k: int, hd: int, alignment: str, reg: float) -> np.ndarray:
    """Cell coupling that keeps heads whole: heads matched by the optimal cost of matching their
    dimensions, then the dimensions of each matched pair (``T[(i,d),(j,e)] = T_h[i,j] P_ij[d,e]``)."""
    blocks = cost.reshape(n, hd, k, hd).transpose(0, 2, 1, 3)
    head_cost = np.array([[cost_value(blocks[i, j]) for j in range(k)] for i in range(n)])
    th = couple(head_cost, alignment, reg)
    out = np.zeros((n * hd, k * hd))
    floor = th.max() * 1e-9
    for i in range(n):
        for j in range(k):
            if th[i, j] > floor:
                out[i * hd:(i + 1) * hd, j * hd:(j + 1) * hd] = th[i, j] * couple(blocks[i, j], alignment, reg) * hd
    return out / out.sum() if out.sum() > 0 else out


def support(dist: np.ndarray, k: int, iterations: int = 6) -> np.ndarray:
    """``k`` representative units (medoids of a balanced assignment), sorted: a narrower target's units.

    Starts from a greedy k-center choice (the unit nearest everything first), then alternates a balanced
    hard assignment (``ot.emd``) with moving each target to the medoid of its members."""
    chosen = [int(np.argmin(dist.sum(1)))]
    while len(chosen) < k:
        chosen.append(int(np.argmax(dist[:, chosen].min(1))))
    sup = np.array(sorted(chosen))
    for _ in range(iterations):
        t = couple(dist[:, sup], "hard")
        new = []
        for j in range(k):
            members = np.flatnonzero(t[:, j] > 0)
            inner = dist[np.ix_(members, members)].sum(1)
            new.append(int(members[np.argmin(inner)]))
        new_sup = np.array(sorted(set(new)))
        if len(new_sup) < k or np.array_equal(new_sup, sup):
            break
        sup = new_sup
    return sup


def head_distances(cost: np.ndarray, n: int, hd: int) -> np.ndarray:
    """Distances between whole heads of one model: the optimal cost of matching their dimensions."""
    blocks = cost.reshape(n, hd, n, hd).transpose(0, 2, 1, 3)
    return np.array([[cost_value(blocks[i, j]) if i != j else 0.0 for j in range(n)] for i in range(n)])


def narrow(space: Space, feats: dict[str, np.ndarray], k: int, settings: Settings) -> tuple[np.ndarray, Map]:
    """Units of the anchor kept as a narrower target's units, and the anchor's map into them.

    Heads keep whole (the anchor's heads are merged into its kept heads, dimensions matched per pair)."""
    every = np.concatenate([feats[r] for r in sorted(feats)], 1)
    if space.kind == "head" and space.head_dim:
        hd = space.head_dim
        cells = distances(every, every)
        keep = support(head_distances(cells, space.heads, hd), k)
        cols = np.concatenate([np.arange(j * hd, (j + 1) * hd) for j in keep])
        return keep, Map({"all": per_head(cells[:, cols], space.heads, k, hd, settings.alignment, settings.reg)})
    dist = distances(every, every)
    keep = support(dist, k)
    return keep, Map({"all": couple(dist[:, keep], settings.alignment, settings.reg)})


def barycenters(m: Map, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Target features: each target unit the average of the anchor units its map sends there."""
    return {r: (m.matrix(r, input_side=False).numpy() @ x) for r, x in feats.items()}
