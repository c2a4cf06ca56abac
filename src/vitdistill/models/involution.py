"""A tiny involution network (RedNet-style) for 16-32 px inputs: Co-advise's second inductive bias.

Involution (Li, Hu, Wang, He, Wang, Yang, Chen, Zhang, "Involution: Inverting the Inherence of
Convolution for Visual Recognition", CVPR 2021, arXiv:2103.06255) inverts convolution's two
properties: its kernel is *spatial-specific* (generated per pixel from that pixel's features) and
*channel-agnostic* (shared by the ``group_channels`` channels of a group). For a K x K involution with
G groups, at pixel (i, j):

    H_{i,j} = phi(X_{i,j}) = W_1 sigma(W_0 X_{i,j}),          H_{i,j} in R^{K x K x G}
    Y_{i,j,k} = sum_{(u,v) in Delta_K} H_{i,j,u+K//2,v+K//2,ceil(kG/C)} X_{i+u,j+v,k}

with W_0 a 1x1 reduction (ratio r) followed by BN and ReLU (sigma) and W_1 a 1x1 map to K*K*G
kernel weights. With stride s the kernel is generated from the s x s average-pooled input.

RedNet replaces the 3x3 convolution of every ResNet bottleneck by a 7x7 involution; ``rednet_micro_inv``
does the same at micro scale (stem 3x3 conv + 3x3 involution at stride 1, four stages of one
bottleneck each, widths 32/64/256/512, strides 1/2/2/2), about 0.3M parameters.

Importing this module registers ``rednet_micro_inv`` with timm's ``register_model``, so
``timm.create_model("rednet_micro_inv", num_classes=10)`` builds it. Like timm's CNNs it has
``feature_info`` (stem, then the four stages), ``num_classes`` and a ``pretrained_cfg`` with the
ImageNet mean/std, and it accepts any input size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

__all__ = ["Involution", "RedNetMicro", "rednet_micro_inv", "shifted_sum", "unfold_sum"]


class Involution(nn.Module):
    """K x K involution over ``channels`` channels in groups of ``group_channels`` (paper Alg. 1)."""

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 8,
                 reduction: int = 4) -> None:
        super().__init__()
        if channels % group_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of group_channels ({group_channels})")
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = channels // group_channels
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, max(1, channels // reduction), 1, bias=False),
            nn.BatchNorm2d(max(1, channels // reduction)),
            nn.ReLU(inplace=True),
        )
        self.span = nn.Conv2d(max(1, channels // reduction), kernel_size * kernel_size * self.groups, 1)
        # ceil_mode matches unfold's output size, ceil(H / s), for odd sizes too
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.span(self.reduce(self.pool(x)))  # [B, K*K*G, h, w]: one kernel per pixel and group
        # Without autograd (a teacher's forward, evaluation) the shifted-window sum runs about 3x faster
        # on CPU at 32 px; in training, unfold's backward is the faster one (benchmarks/involution.py).
        apply = unfold_sum if torch.is_grad_enabled() else shifted_sum
        return apply(x, kernel, self.kernel_size, self.groups, self.stride)


def unfold_sum(x: torch.Tensor, kernel: torch.Tensor, k: int, g: int, s: int) -> torch.Tensor:
    """Y = sum over the K x K offsets of kernel times input patch, through ``F.unfold`` (paper Alg. 1)."""
    b, c = x.shape[:2]
    h, w = kernel.shape[-2:]
    patches = F.unfold(x, k, padding=(k - 1) // 2, stride=s).view(b, g, c // g, k * k, h, w)
    return (kernel.view(b, g, 1, k * k, h, w) * patches).sum(dim=3).view(b, c, h, w)


def shifted_sum(x: torch.Tensor, kernel: torch.Tensor, k: int, g: int, s: int) -> torch.Tensor:
    """The same sum as :func:`unfold_sum`, as one multiply-add per offset over a shifted window.

    It never builds unfold's K*K-times-larger patch tensor; that copy and the product over it were 75 %
    of ``rednet_micro_inv``'s forward time.
    """
    b, c, height, width = x.shape
    h, w = kernel.shape[-2:]
    kernel = kernel.view(b, g, 1, k * k, h, w)
    p = (k - 1) // 2
    padded = F.pad(x, (p, p, p, p)).view(b, g, c // g, height + 2 * p, width + 2 * p)
    out = x.new_zeros(b, g, c // g, h, w)
    for u in range(k):
        for v in range(k):
            window = padded[..., u:u + s * (h - 1) + 1:s, v:v + s * (w - 1) + 1:s]
            out.addcmul_(kernel[:, :, :, u * k + v], window)
    return out.view(b, c, h, w)


class InvBottleneck(nn.Module):
    """RedNet's bottleneck: 1x1 conv, K x K involution (carrying the stride), 1x1 conv, residual."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, kernel_size: int, expansion: int = 4,
                 group_channels: int = 8) -> None:
        super().__init__()
        mid = out_chs // expansion
        self.conv1 = nn.Sequential(nn.Conv2d(in_chs, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.inv = nn.Sequential(Involution(mid, kernel_size, stride, group_channels), nn.BatchNorm2d(mid),
                                 nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(mid, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv3(self.inv(self.conv1(x))) + shortcut)


class RedNetMicro(nn.Module):
    """A micro RedNet for small images: stem (3x3 conv, 3x3 involution), four one-block stages, pool, fc."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, stem_width: int = 16,
                 channels: tuple[int, ...] = (32, 64, 256, 512), strides: tuple[int, ...] = (1, 2, 2, 2),
                 kernel_size: int = 7, group_channels: int = 8, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            Involution(stem_width, 3, 1, group_channels), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
        )
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="stem")]
        prev, reduction = stem_width, 1
        for i, (chs, stride) in enumerate(zip(channels, strides)):
            reduction *= stride
            block = InvBottleneck(prev, chs, stride, kernel_size, group_channels=group_channels)
            self.add_module(f"layer{i + 1}", block)
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"layer{i + 1}"))
            prev = chs
        self.num_stages = len(channels)
        self.num_features = self.head_hidden_size = prev
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(num_classes: int) -> dict:
    return dict(architecture="rednet_micro_inv", num_classes=num_classes, input_size=(3, 32, 32),
                pool_size=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="stem.0",
                classifier="fc", interpolation="bilinear", crop_pct=1.0)


# timm reads ``default_cfgs`` of the module at registration: the name then has a pretrained cfg (no weights)
default_cfgs = {"rednet_micro_inv": _cfg(1000)}


@register_model
def rednet_micro_inv(pretrained: bool = False, **kwargs) -> RedNetMicro:
    """RedNet-style micro involution network, about 0.3M parameters, for 16-32 px images."""
    if pretrained:
        raise RuntimeError("rednet_micro_inv has no pretrained weights")
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}  # e.g. the resolution it is built for
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    model = RedNetMicro(**kwargs)
    model.pretrained_cfg = model.default_cfg = {**_cfg(model.num_classes), **overlay}
    return model
