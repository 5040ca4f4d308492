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


def trained_digits_vit(seed: int, steps: int = 150, **sizes: int) -> ModelGraph:
    """``digits_vit(seed)`` after ``steps`` of plain Adam on the digits train split (batches drawn from ``seed``):
    parents with some skill (about 0.75 accuracy), each its own, in a few seconds."""
    from modelpress.data.digits import digits_split

    graph = digits_vit(seed, **sizes)
    x, y, _, _ = digits_split(0)
    x, y = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(graph.module.parameters(), lr=5e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(graph.module(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    graph.module.eval()
    return graph
