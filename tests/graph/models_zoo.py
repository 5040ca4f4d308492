"""Small models of several families, built offline from configs (random weights, seeded)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from modelpress.graph import InputSpec, ModelGraph


class FusedQKVAttention(nn.Module):
    """Attention with one fused qkv Linear and a head count attribute used in the reshape."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class FusedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusedQKVAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class FusedViT(nn.Module):
    """A tiny pre-norm ViT over [B, 1, 8, 8] images with fused-qkv attention."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.ModuleList(FusedBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.input_spec = InputSpec("image", ["pixel_values"], shape=(1, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def build(family: str) -> ModelGraph:
    """A seeded small model of ``family`` as a ModelGraph."""
    from modelpress.models.loaders import hf_input_spec

    if family == "fused":
        torch.manual_seed(0)
        m = FusedViT()
        return ModelGraph(m.eval(), m.input_spec, {"kind": "factory", "target": "tests.graph.models_zoo:FusedViT"}, name=family)
    m = hf_model(family)
    spec = hf_input_spec(m)
    if spec.kind == "image":
        spec.shape = (3, 16, 16) if family == "vit" else (3, 32, 32)
    source = {"kind": "hf", "class": type(m).__name__, "config": m.config.to_dict()}
    return ModelGraph(m, spec, source, name=family)


@functools.cache
def _discovered(family: str) -> tuple[ModelGraph, torch.Tensor]:
    graph = build(family)
    rng = torch.get_rng_state()  # what build() leaves torch's global generator at
    _ = graph.groups, graph.blocks  # trace, propagation, groups, dry runs (none of it draws from the global RNG)
    return graph, rng


def traced(family: str) -> ModelGraph:
    """``build(family)`` with its discovery done, once per session: read it, never edit it (use ``fresh``)."""
    return _discovered(family)[0]


def fresh(family: str) -> ModelGraph:
    """What ``build(family)`` gives (the same weights, torch's global RNG left where build leaves it), but a
    copy of ``traced(family)``: the copy carries the trace, groups and blocks, so it never re-traces
    (tests/graph/test_edits.py checks that a copy's discovery equals a fresh trace's)."""
    graph, rng = _discovered(family)
    torch.set_rng_state(rng)
    return graph.copy()


def hf_model(family: str) -> nn.Module:
    """A seeded small Hugging Face model of ``family`` in eval mode (random weights, built from its config)."""
    import transformers as T

    torch.manual_seed(0)
    if family == "bert":
        m = T.BertModel(T.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64))
    elif family == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=5))
    elif family == "distilbert":
        m = T.DistilBertModel(T.DistilBertConfig(vocab_size=500, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                 max_position_embeddings=64))
    elif family == "gpt2":  # Conv1D layers, fused qkv, LM head tied to the token embedding
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           use_cache=False))
    elif family in ("llama", "llama_tied"):  # grouped-query attention (2 queries per key/value head), rotary, gated MLP, RMSNorm
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=family == "llama_tied", use_cache=False))
        with torch.no_grad():  # RMSNorm weights away from 1, so that their slices are visible
            for mod in m.modules():
                if type(mod).__name__.endswith("RMSNorm"):
                    mod.weight.uniform_(0.5, 1.5)
    elif family == "resnet":  # image_size: the input size a loader reads from the config (ResNet has none)
        m = T.ResNetForImageClassification(T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                                          depths=[2, 2], layer_type="basic", num_labels=5,
                                                          image_size=32))
    elif family == "convnext":
        m = T.ConvNextForImageClassification(T.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[2, 2],
                                                              num_stages=2, num_labels=5, image_size=32))
    elif family == "roberta":  # positions offset by the padding id (2): 130 positions hold the default 128 tokens
        m = T.RobertaModel(T.RobertaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=130))
    elif family == "albert":  # factorized embedding (32 -> 64), one layer group shared by both layers
        m = T.AlbertModel(T.AlbertConfig(vocab_size=500, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=64))
    elif family == "electra":  # embedding projected 32 -> 64
        m = T.ElectraModel(T.ElectraConfig(vocab_size=500, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=64))
    elif family == "deit":  # class and distillation tokens
        m = T.DeiTForImageClassification(T.DeiTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=128, num_labels=5))
    elif family == "swin":  # windowed attention, patch merging between stages
        m = T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                                      num_heads=[2, 4], window_size=4, num_labels=5))
    elif family == "mobilevit":  # hybrid: MobileNetV2 blocks and transformer blocks over unfolded patches
        m = T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_attention_heads=2, patch_size=2, num_labels=5))
    elif family == "levit":  # hybrid: conv stem, attention with BatchNorm'd linears, attention subsampling
        m = T.LevitForImageClassification(T.LevitConfig(
            image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=5))
    else:
        raise ValueError(family)
    m.eval()
    # BatchNorm running stats away from their init values, so channel edits are visible
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m
