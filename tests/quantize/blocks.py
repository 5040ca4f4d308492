"""Small synthetic transformer blocks for the quantization tests (BERT-style post-norm, ViT-style pre-norm)."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def consumers(self, prefix: str) -> list[str]:
        return [f"{prefix}.qkv"] if self.fused else [f"{prefix}.{n}" for n in ("q", "k", "v")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (y.reshape(b, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class PreNormBlock(nn.Module):
    """ViT-style: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int = 32, heads: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class PostNormBlock(nn.Module):
    """BERT-style: norm1(x + attn(x)); norm2(h + mlp(h)): the norms' outputs are also the residual stream."""

    def __init__(self, dim: int = 32, heads: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, fused)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attn(x))
        return self.norm2(h + self.fc2(nn.functional.gelu(self.fc1(h))))


class Stack(nn.Module):
    """An input norm (like BERT's embedding LayerNorm) then blocks, then a head."""

    def __init__(
        self, kind: str = "pre", depth: int = 2, dim: int = 32, heads: int = 4, fused: bool = False
    ) -> None:
        super().__init__()
        cls = PreNormBlock if kind == "pre" else PostNormBlock
        self.kind = kind
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(cls(dim, heads, fused) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # strong inter-channel variation, as in trained transformers
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    spread = torch.exp(torch.randn(dim, generator=g) * 1.0)
                    m.weight.copy_(spread)
                    m.bias.copy_(torch.randn(dim, generator=g) * spread)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.final_norm(x))

    def norm_pairs(self) -> list[tuple[str, list[str]]]:
        """(norm, consumer Linears) by name, as the model graph reports them."""
        pairs: list[tuple[str, list[str]]] = []
        if self.kind == "pre":
            for i, blk in enumerate(self.blocks):
                pairs.append((f"blocks.{i}.norm1", blk.attn.consumers(f"blocks.{i}.attn")))
                pairs.append((f"blocks.{i}.norm2", [f"blocks.{i}.fc1"]))
        else:
            prev = "embed_norm"
            for i, blk in enumerate(self.blocks):
                pairs.append((prev, blk.attn.consumers(f"blocks.{i}.attn")))
                pairs.append((f"blocks.{i}.norm1", [f"blocks.{i}.fc1"]))
                prev = f"blocks.{i}.norm2"
        pairs.append(("final_norm", ["head"]))
        return pairs
