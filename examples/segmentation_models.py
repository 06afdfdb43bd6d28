"""Two dense-prediction networks small enough to train on two CPU cores, in plain torch layers.

- :class:`UNet` — the encoder–decoder of Ronneberger et al., "U-Net" (MICCAI 2015, Fig. 1):
  conv-BN-ReLU stages, max-pool down, skip connections concatenated in the decoder. The deepest
  step goes up with a learned ``ConvTranspose2d`` (the paper's "up-convolution"); the other steps
  with ``F.interpolate`` (bilinear, then nearest), the forms later U-Nets use, so one model holds
  the three upsampling ops an exporter meets.
- :class:`DeepLab` — the DeepLabv3 layout of Chen et al., "Rethinking Atrous Convolution"
  (2017), §3.3 and Fig. 5: a strided backbone whose last stage keeps its resolution with a
  dilated conv, then ASPP (a 1×1 branch, dilated 3×3 branches, and an image-level branch —
  global average pool, 1×1 conv, upsampled back bilinearly), concatenated and projected, and
  bilinear upsampling to the input size before the 1×1 classifier.

Both return per-pixel logits ``[N, num_classes, H, W]`` at the input's size, any ``H, W`` ≥ 1
(the U-Net pools with ``ceil_mode`` and crops its up-convolution to the skip it joins). torchvision's segmentation models do not import
beside the CPU torch here (docs/toolchain_notes.md), hence these. Every ReLU is its own module
and every size is read from the input, so Brevitas' FX trace converts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3×3 (or ``kernel``) conv, dilation ``dilation`` (padding keeps the size), BN, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel // 2)
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Three resolutions (``widths``); decoder steps: ConvTranspose2d, bilinear, nearest."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = nn.Sequential(ConvBNReLU(in_channels, w1), ConvBNReLU(w1, w1))
        self.pool1 = nn.MaxPool2d(2, ceil_mode=True)  # ceil: an odd size keeps its last row/column
        self.enc2 = ConvBNReLU(w1, w2)
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.bottleneck = ConvBNReLU(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)  # quarter → half resolution
        self.relu_up2 = nn.ReLU()
        self.dec2 = ConvBNReLU(2 * w2, w2)  # [up, skip] concatenated
        self.reduce1 = ConvBNReLU(w2, w1, kernel=1)
        self.dec1 = ConvBNReLU(2 * w1, w1)
        self.refine = ConvBNReLU(w1, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool1(skip1))
        deep = self.bottleneck(self.pool2(skip2))
        # the up-convolution doubles ⌈H/4⌉, one more than the skip's ⌈H/2⌉ when that is odd: crop
        # (after the ReLU, so the concat still sees an unsigned grid; a no-op at multiples of 4)
        up = self.relu_up2(self.up2(deep))[..., :skip2.shape[-2], :skip2.shape[-1]]
        y = self.dec2(torch.cat([up, skip2], dim=1))
        # bilinear back to full resolution, concat with the first skip
        y = F.interpolate(self.reduce1(y), size=skip1.shape[-2:], mode="bilinear", align_corners=False)
        y = self.dec1(torch.cat([y, skip1], dim=1))
        # a nearest up/down pair inside the full-resolution path (an exact op an exporter must keep)
        # (sized by the input, so odd sizes come back whole; the same op as scale_factor=2 at even sizes)
        y = F.interpolate(F.max_pool2d(y, 2, ceil_mode=True), size=y.shape[-2:], mode="nearest") + self.refine(y)
        return self.head(y)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3 §3.3): 1×1, dilated 3×3s, image pooling; concat; 1×1."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (2, 4)) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, cout, kernel=1)
        self.atrous = nn.ModuleList(ConvBNReLU(cin, cout, dilation=r) for r in rates)
        self.image_pool = nn.AdaptiveAvgPool2d(1)
        self.image_conv = nn.Conv2d(cin, cout, 1)  # no BN on a 1×1 map of batch statistics
        self.image_relu = nn.ReLU()
        self.project = ConvBNReLU(cout * (2 + len(rates)), cout, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_relu(self.image_conv(self.image_pool(x)))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
        branches = [self.branch1x1(x), *[branch(x) for branch in self.atrous], pooled]
        return self.project(torch.cat(branches, dim=1))


class DeepLab(nn.Module):
    """Output stride 4: two strided stages, a dilated stage at the same resolution, ASPP, upsampling, 1×1 head."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 48),
                 rates: tuple[int, ...] = (2, 4)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = ConvBNReLU(in_channels, w1)
        self.layer1 = ConvBNReLU(w1, w2, stride=2)
        self.layer2 = nn.Sequential(ConvBNReLU(w2, w3, stride=2), ConvBNReLU(w3, w3, dilation=2))
        self.aspp = ASPP(w3, w2, rates)
        self.head = nn.Conv2d(w2, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.aspp(self.layer2(self.layer1(self.stem(x))))
        # features, not logits, are upsampled (as DeepLabv3+'s decoder does): the 1x1 head then
        # writes its logits on the 8-bit output grid directly, and equal logit codes stay equal
        # in onnxruntime (bilinear values of equal codes may differ by a float32 rounding, which
        # turns an argmax tie into a changed prediction)
        features = F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(features)


def _init(model: nn.Module) -> nn.Module:
    # He et al. 2015 ("Delving deep into rectifiers") init for ReLU convs, as in torchvision
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


SEGMENTATION_MODELS = ("unet", "deeplab")


def build_segmentation_model(name: str = "unet", num_classes: int = 11, in_channels: int = 3,
                             width: int = 16) -> nn.Module:
    """A fresh U-Net or DeepLab (``name`` in :data:`SEGMENTATION_MODELS`); a checkpoint can name this.

    ``width`` is the first stage's channel count (16: the models above; 8: the quarter-cost
    U-Net of ``make demo``'s small segmentation case); deeper stages scale with it.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if name == "unet":
        return _init(UNet(num_classes, in_channels, widths=(width, 2 * width, 4 * width)))
    if name == "deeplab":
        return _init(DeepLab(num_classes, in_channels, widths=(width, 2 * width, 3 * width)))
    raise ValueError(f"unknown segmentation model {name!r}; choose from {SEGMENTATION_MODELS}")
