"""Class-wise pruning (ED-ViT, Liu et al., 2024): split a classifier into K sub-models, one per subset of the
classes, prune each on its subset's data, fuse their outputs, and place them on devices.

Steps, for a classifier over C classes:

1. **Split the classes** into K subsets, given (``subsets``), or balanced automatically (``k``): contiguous
   runs of the class indices whose sizes differ by at most one. Every class belongs to exactly one subset.
2. **Restrict and prune** (per subset S): a copy of the model keeps only the classifier's rows for S, so it
   outputs ``logits[:, S]`` of the original exactly; ``prune.global`` (called as a pass, with a Context whose
   data holds only S's samples and whose reference is the restricted copy) prunes it to ``ratio`` of the
   *full* model's parameters with saliency measured on S's data alone; then it is recovered on S's train
   samples by distilling from the restricted copy (KL on the S logits, label-free by default; with
   ``label_weight > 0`` the labels, remapped to S's indices, are mixed in). ``recover_data: all`` distils
   the S logits on every train sample instead (the saliency stays S's): the sub-model then also learns what
   the original says about S on the other classes' images, which keeps the K outputs comparable. A sample belongs to the subset
   of its label, or, when the data has no labels, of the original model's prediction.
3. **Combine** the K sub-models' logits into one prediction over all C classes. Two rules, both fitted on
   the calibration split (or ``fusion_data: train``) and both measured:

   - ``concat`` (calibrated concatenation): sub-model k's logits become ``z_k / T_k + b_k`` (a temperature
     and an offset per sub-model, ``b_0 = 0``, fitted jointly by minimizing the negative log-likelihood of
     the softmax over all C classes, with a small Gaussian prior on ``log T_k`` and ``b_k``), concatenated
     and put back in the original class order; argmax. The report gives the uncalibrated concatenation too.
   - ``fusion`` (ED-ViT's fusion head): the K logit vectors, concatenated and standardized, go through a
     small MLP (``fusion_hidden`` units; 0: linear) to C logits, trained by cross-entropy (Adam, full batch,
     seeded).

4. **Place** the sub-models on ``devices`` (see :mod:`modelpress.prune.placement`): latencies measured on
   each device's Target with modelpress.bench (batch 1), or given; memory = the sub-model's weight bytes.

:func:`classwise_split` returns a :class:`ClasswiseResult` (sub-model graphs, class lists, both combiners,
the assignment and a report); :meth:`ClasswiseResult.save` writes one ONNX file per sub-model (and its
reloadable weights), both combiners as ONNX (``fusion.onnx``, ``concat.onnx``) plus ``combine.json`` and
``fusion.safetensors``, the assignment (JSON and text) and ``report.json``, atomically.
:func:`onnx_predict` runs a saved split in ONNX Runtime.

As a recipe pass (``prune.classwise``): one graph goes in and K come out, so the pass returns its input graph
unchanged (the pipeline's ``model.onnx`` is the original model) and writes the split into ``classwise/`` of the
run's output folder; its summary (each sub-model's size and latency against the full model's, measured in one
run, the combined accuracy, the placement) is in the pass's metrics, and the run's table and report show it in
place of the unchanged model's. Put it last among the graph passes: later passes would change the original,
not the sub-models.

Modules, by job: :mod:`.config` (settings), :mod:`.subsets` (class subsets, the classifier rows),
:mod:`.data` (per-subset re-batched data), :mod:`.combiners` (both rules and their fitting), :mod:`.result`
(the split, its ONNX files, :func:`onnx_predict`), :mod:`.measure` (memory, latency), :mod:`.split` (the
split itself) and :mod:`.recipe_pass` (the pass).
"""

from __future__ import annotations

from modelpress.prune.classwise.combiners import ConcatCombiner, FusionHead
from modelpress.prune.classwise.config import ClasswiseConfig
from modelpress.prune.classwise.recipe_pass import ClasswisePrune
from modelpress.prune.classwise.result import ClasswiseResult, SubModel, onnx_predict
from modelpress.prune.classwise.split import classwise_split
from modelpress.prune.classwise.subsets import balanced_subsets, classifier_group

__all__ = [
    "ClasswiseConfig",
    "ClasswisePrune",
    "ClasswiseResult",
    "ConcatCombiner",
    "FusionHead",
    "SubModel",
    "balanced_subsets",
    "classifier_group",
    "classwise_split",
    "onnx_predict",
]
