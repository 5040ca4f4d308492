"""Small models of the structures that crashed the graph (issue 18, items 1-3), loadable through the
``package.module:factory`` checkpoint form (``tests.graph.structures:one_block_stage`` ...).

Each factory seeds torch, so two loads build the same weights; each module carries its ``input_spec``.
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.graph import InputSpec

IMAGE = (3, 16, 16)
TOKENS, FEATURES = 8, 12


# ------------------------------------------------------------------ (a) hierarchical stages, one of one block


class ResidualConv(nn.Module):
    """x + conv(relu(bn(conv(x)))): a shape-keeping residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.conv2 = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class Stage(nn.Module):
    """A strided downsampling conv, then a Sequential of residual blocks."""

    def __init__(self, c_in: int, c_out: int, depth: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 2, stride=2)
        self.blocks = nn.Sequential(*[ResidualConv(c_out) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class StagedNet(nn.Module):
    """Hierarchical stages (ConvNeXt/Swin-like) whose depths are ``depths``: a depth of 1 is a lone block."""

    def __init__(self, depths: tuple[int, ...] = (2, 1), widths: tuple[int, ...] = (8, 16), classes: int = 5) -> None:
        super().__init__()
        self.input_spec = InputSpec("image", ["pixel_values"], shape=IMAGE)
        chans = (IMAGE[0], *widths)
        self.stages = nn.ModuleList(Stage(chans[i], chans[i + 1], d) for i, d in enumerate(depths))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


def one_block_stage() -> StagedNet:
    """Two stages: the first holds two residual blocks, the second one whose branch ends in a zero-initialized
    conv (as timm's ``zero_init_last``): it adds nothing yet, so a saliency ranking picks it for removal first."""
    torch.manual_seed(0)
    model = StagedNet().eval()
    with torch.no_grad():
        model.stages[1].blocks[0].conv2.weight.zero_()
        model.stages[1].blocks[0].conv2.bias.zero_()
    return model


# ------------------------------------------------------------------ (b) expanded depthwise + squeeze-excitation


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


class InvertedResidual(nn.Module):
    """MobileNetV3/EfficientNet block: 1x1 expand, depthwise 3x3, squeeze-excitation, 1x1 project."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, 2 * c_in)
        self.project = conv_bn(hidden, c_out, 1)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.hardswish(self.expand(x))
        y = self.project(self.se(nn.functional.hardswish(self.depthwise(y))))
        return x + y if self.residual else y


class MobileNetish(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.input_spec = InputSpec("image", ["pixel_values"], shape=IMAGE)
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 4),
            InvertedResidual(16, 24, 4, 2),
            InvertedResidual(24, 24, 4),
            InvertedResidual(24, 24, 4),
        )
        self.head = nn.Linear(24, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.blocks(nn.functional.hardswish(self.stem(pixel_values)))
        return self.head(x.mean((2, 3)))


def depthwise_se() -> MobileNetish:
    """Expanded depthwise blocks with squeeze-excitation and BatchNorm, some residual, one strided."""
    torch.manual_seed(0)
    model = MobileNetish().eval()
    with torch.no_grad():  # running statistics other than the defaults, so that a mix-up shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ------------------------------------------------------------------ (c) one per-head bias table for all layers


class BiasedSelfAttention(nn.Module):
    """Multi-head attention adding a [heads, n, n] position bias to its scores. As in T5, only the first
    layer's attention holds the relative-position table: it computes the bias, and every later layer gets it."""

    def __init__(self, dim: int, heads: int, has_table: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.relative_bias = nn.Embedding(2 * TOKENS - 1, heads) if has_table else None

    def position_bias(self, n: int) -> torch.Tensor:
        assert self.relative_bias is not None
        pos = torch.arange(n)
        return self.relative_bias(pos[None, :] - pos[:, None] + n - 1).permute(2, 0, 1)  # [heads, n, n]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        if bias is None:
            bias = self.position_bias(n)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))  # as T5 does
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(out), bias


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, has_table: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = BiasedSelfAttention(dim, heads, has_table)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y, bias = self.attn(self.norm1(x), bias)
        x = x + y
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x)))), bias


class SharedBiasEncoder(nn.Module):
    """A T5-like encoder: layer 0 computes the per-head bias from its table and passes it to every layer."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 32, layers: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.input_spec = InputSpec("tensor", ["x"], shape=(TOKENS, FEATURES))
        self.embed = nn.Linear(FEATURES, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, i == 0) for i in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bias = self.embed(x), None
        for layer in self.layers:
            h, bias = layer(h, bias)
        return self.head(self.norm(h).mean(1))


def shared_bias_encoder() -> SharedBiasEncoder:
    torch.manual_seed(0)
    return SharedBiasEncoder().eval()
