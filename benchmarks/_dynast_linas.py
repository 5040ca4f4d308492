"""One step of DyNAS-T's LINAS, run in DyNAS-T's own venv (``benchmarks/search.py --parts dynast``).

DyNAS-T 1.6's ``LINAS.search`` is wired to its registered super-networks (OFA, BERT-SST2, ViT-ImageNet...),
so the benchmark drives the same loop with DyNAS-T's own parts, one step per call: the initial population
is ``EncodingBase.random_sample`` draws; after each measured population, a ``dynast.predictors.Predictor``
(ridge / SVR, grid-searched) is trained per objective on ``EncodingBase.onehot_generic`` features of every
measured candidate, and ``EvolutionaryManager`` (NSGA-II for 2 objectives, U-NSGA-III for 3, as in
``LINAS.search``) searches the predictors; its final population is the next one to measure.

``import dynast`` fails on Python 3.11 (its ``__init__`` imports ``dynast_manager`` -> ``search_tactic`` ->
fairseq 0.12.2, whose dataclasses have mutable defaults: ValueError on 3.11), so the package's ``__init__``
is bypassed: a bare ``dynast`` package module is registered and only the parts above are imported.

stdin: {"upper": [...], "population": P, "inner_evals": E, "seed": S, "measured": [[x, [f...]], ...]}
(objectives minimized); stdout: the last line is {"population": [[genes...], ...]}.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np


def import_parts() -> None:
    """Register ``dynast`` as a bare package (its __init__ imports fairseq, broken on Python 3.11)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("dynast")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("dynast is not installed")
    pkg = types.ModuleType("dynast")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["dynast"] = pkg


def main() -> int:
    import_parts()
    from dynast.predictors.dynamic_predictor import Predictor
    from dynast.search.encoding import EncodingBase
    from dynast.search.evolutionary import (
        EvolutionaryManager,
        EvolutionaryManyObjective,
        EvolutionaryMultiObjective,
    )

    req = json.loads(sys.stdin.read())
    upper = [int(u) for u in req["upper"]]
    enc = EncodingBase({f"g{i}": {"count": 1, "vars": list(range(u + 1))} for i, u in enumerate(upper)},
                       seed=req["seed"])
    measured = req.get("measured") or []
    if not measured:
        random.seed(req["seed"])
        print(json.dumps({"population": [enc.random_sample() for _ in range(req["population"])]}))
        return 0
    feats = np.array([enc.onehot_generic(x) for x, _ in measured])
    values = np.array([f for _, f in measured], dtype=float)
    n_obj = values.shape[1]
    predictors = []
    for j in range(n_obj):
        p = Predictor()
        p.train(feats, values[:, j])
        predictors.append(p)

    class Interface:
        """DyNAS-T's prediction interface: eval_subnet(x) -> (config, objective values...)."""

        def eval_subnet(self, x):  # noqa: ANN001, ANN202
            f = enc.onehot_generic([int(v) for v in x])[None, :]
            return (None, *[float(p.predict(f)[0]) for p in predictors])

    cls = EvolutionaryMultiObjective if n_obj == 2 else EvolutionaryManyObjective
    problem = cls(evaluation_interface=Interface(), param_count=enc.param_count, param_upperbound=enc.param_upperbound)
    manager = EvolutionaryManager(algorithm="nsga2" if n_obj == 2 else "unsga3", seed=req["seed"], n_obj=n_obj)
    if n_obj == 2:
        manager.configure_nsga2(population=req["population"], num_evals=req["inner_evals"])
    else:
        manager.configure_unsga3(population=req["population"], num_evals=req["inner_evals"])
    result = manager.run_search(problem)
    pop = [[int(v) for v in row] for row in result.pop.get("X")]
    print()
    print(json.dumps({"population": pop}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
