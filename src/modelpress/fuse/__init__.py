"""Optimal-transport fusion of transformers (Imfeld et al., "Transformer Fusion with Optimal Transport",
ICLR 2024), as a method package (layer L4) over the model graph.

- ``spaces``: the graph's groups as alignment spaces (attention as head x dimension cells, q/k/v roles);
- ``features``: alignment costs from weights or activations (probes), residual-stream policies;
- ``transport``: exact (``ot.emd``) and entropic (``ot.sinkhorn``) plans from POT;
- ``align``: the flow through the model, the QK modes, narrower targets;
- ``maps``: moving parameters through the maps (output side averages, input side distributes);
- ``fusion``: ``fuse()``, vanilla averaging, the parents' ensemble;
- ``passes``: the ``fuse.ot`` merge pass with label-free recovery by distillation from the ensemble.
"""

from modelpress.fuse.fusion import Ensemble, Fusion, FusionSettings, check_models, fuse, vanilla_average

__all__ = ["Ensemble", "Fusion", "FusionSettings", "check_models", "fuse", "vanilla_average"]
