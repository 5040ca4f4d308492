"""Recovery after compression (a method package, layer L4): the ``recover`` pass distils the original model
into the compressed one through the shared training loop (:mod:`modelpress.train`), label-free by default.

A recipe runs it after a pruning pass::

    passes:
      - pass: prune.magnitude
        ratios: {mlp: 0.5, head: 0.25}
      - pass: recover
        steps: 200
"""

from modelpress.recover.passes import Recover, RecoverConfig

__all__ = ["Recover", "RecoverConfig"]
