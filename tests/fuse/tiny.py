"""Tiny seeded ViTs on digits (1x8x8, patch 4: 5 tokens) for fusion tests: independent parents in seconds."""

from __future__ import annotations

import torch

from modelpress.graph import ModelGraph


def digits_vit(seed: int, *, layers: int = 2, hidden: int = 32, heads: int = 2, mlp: int = 64) -> ModelGraph:
    """A randomly initialized HF ViT classifier for digits, drawn from ``seed`` (different seeds: different models)."""
    import transformers as T

    from modelpress.models.loaders import hf_input_spec

    torch.manual_seed(seed)
    m = T.ViTForImageClassification(T.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=mlp, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    spec = hf_input_spec(m)
    spec.shape = (1, 8, 8)
    source = {"kind": "hf", "class": type(m).__name__, "config": m.config.to_dict()}
    return ModelGraph(m, spec, source, name=f"vit{seed}")


def batches(graph: ModelGraph, n: int = 3, size: int = 8) -> list[dict]:
    """``n`` seeded random input batches of ``size`` samples."""
    return [graph.example_inputs(size, seed=s) for s in range(n)]
