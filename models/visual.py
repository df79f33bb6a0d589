"""Visual inputs: what a visual token is (patch, region, pixel-grid cell) and its embedding.

Shapes: B batch, C channels, H/W image size, p patch side / CNN stride, P visual tokens, R scene
objects in the batch, N = R + 1 regions (whole image first), F visual feature size, D model dim,
K tokens kept by pixel sampling, s RoIAlign side.

Every input returns `VisualTokens`: the embedded tokens plus what the region/patch objectives need
(the features before projection as the MRFR regression target, the object class of each token,
which tokens are real, which were masked). Masked tokens (`visual_mask_BP`, masked region
modelling) have their input features zeroed, as UNITER/LXMERT zero masked region features; with
`model.mask_pixels`, regions whose features are computed from pixels zero the pixels of their box
before feature extraction instead (VL-BERT, Su et al. 2020, §3.2), so neither the masked region's
feature nor an overlapping region's can show what was masked.
Features from a trained extractor (conv_stem, pixel CNN) are not detached here: an objective that
regresses onto them should detach its target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import Blocks
from models.config import ImageSpec, ModelConfig
from models.embeddings import box5, patchify
from models.families import VisualKind
from models.objectives.sampling import uniform


class VisualTokens(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3's module hooks find tensors inside tuples, not dataclasses."""

    x_BPD: Tensor  # embedded tokens
    feats_BPF: Tensor  # input features before projection (masked ones zeroed)
    labels_BP: Tensor  # long: object class of the token, -1 unknown
    mask_BP: Tensor  # bool: real token
    masked_BP: Tensor  # bool: features were masked

    def outputs(self) -> dict[str, Tensor]:
        return {"image_feats": self.feats_BPF, "image_labels": self.labels_BP,
                "image_mask": self.mask_BP, "image_masked": self.masked_BP}


class VisualInput(nn.Module):
    """forward(inputs, visual_mask_BP=None, generator=None) -> VisualTokens."""

    feature_size: int
    # Every token of every input is real (`mask_BP` all True): attention over them needs no mask,
    # which the host knows without reading the mask (FlashAttention-eligible; models/encoders/layers.py).
    dense: bool = True

    def num_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        """P for these inputs, before any sampling (what `visual_mask_BP` must cover)."""
        raise NotImplementedError


def _masked(visual_mask_BP: Tensor | None, B: int, P: int, device: torch.device) -> Tensor:
    if visual_mask_BP is None:
        return torch.zeros(B, P, dtype=torch.bool, device=device)
    if tuple(visual_mask_BP.shape) != (B, P):
        raise ValueError(f"visual_mask has shape {tuple(visual_mask_BP.shape)}; this input has [B, P] = [{B}, {P}]")
    return visual_mask_BP.bool()


def grid_labels(inputs: Mapping[str, Tensor], B: int, side: int, device: torch.device) -> Tensor:
    """[B, side*side] class of the object whose box covers each grid cell's centre, else -1."""
    if "obj_boxes" not in inputs or "obj_labels" not in inputs or inputs["obj_labels"].shape[1] == 0:
        return torch.full((B, side * side), -1, dtype=torch.long, device=device)
    boxes_BR4, labels_BR = inputs["obj_boxes"].float(), inputs["obj_labels"]
    centre = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    cy_P, cx_P = (c.reshape(-1) for c in torch.meshgrid(centre, centre, indexing="ij"))
    x0, y0, x1, y1 = (boxes_BR4[..., i, None] for i in range(4))  # [B, R, 1]
    inside_BRP = (x0 <= cx_P) & (cx_P < x1) & (y0 <= cy_P) & (cy_P < y1) & (labels_BR[..., None] >= 0)
    # Shapes-world objects never overlap; elsewhere the later (drawn on top) object wins.
    order_R = torch.arange(1, labels_BR.shape[1] + 1, device=device)
    which_BP = (inside_BRP * order_R[:, None]).amax(dim=1) - 1  # -1 where no box covers the centre
    picked_BP = labels_BR.gather(1, which_BP.clamp(min=0))
    return torch.where(which_BP >= 0, picked_BP, torch.full_like(picked_BP, -1))


class PatchInput(VisualInput):
    """Linear patch projection + learned position + modality type (ViT; ViLT §3.1 keeps it this
    cheap on purpose). `feats` are the raw patch pixels."""

    def __init__(self, cfg: ModelConfig, blocks: Blocks, image: ImageSpec) -> None:
        super().__init__()
        if image.size % cfg.patch_size != 0:
            raise ValueError(f"image size {image.size} is not divisible by patch_size={cfg.patch_size}")
        D, p = cfg.hidden_size, cfg.patch_size
        self.image_size, self.patch = image.size, p
        self.side = image.size // p
        self.feature_size = image.channels * p * p
        # Held as a Conv2d(kernel = stride = p), applied as a Linear on the unfolded patches (the
        # same map): the features before projection are the MRFR target, and checkpoints of the
        # conv-based ViLT keep loading.
        self.proj = nn.Conv2d(image.channels, D, kernel_size=p, stride=p)
        self.position_PD = nn.Parameter(torch.zeros(self.side**2, D))
        self.type_D = nn.Parameter(torch.zeros(D))
        self.dropout = nn.Dropout(cfg.dropout)

    def num_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        return self.side**2

    def forward(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None = None,
                generator: torch.Generator | None = None) -> VisualTokens:
        image_BCHW = inputs["image"]
        H, W = image_BCHW.shape[-2:]
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"image is {H}x{W}, the model's position embeddings are for "
                             f"{self.image_size}x{self.image_size}")
        B, device = image_BCHW.shape[0], image_BCHW.device
        masked_BP = _masked(visual_mask_BP, B, self.side**2, device)
        feats_BPF = patchify(image_BCHW, self.patch) * ~masked_BP[..., None]
        proj_BPD = F.linear(feats_BPF, self.proj.weight.flatten(1), self.proj.bias)
        x_BPD = self.dropout(proj_BPD + self.position_PD + self.type_D)
        return VisualTokens(x_BPD, feats_BPF, grid_labels(inputs, B, self.side, device),
                            torch.ones(B, self.side**2, dtype=torch.bool, device=device), masked_BP)


def roi_align(image_BCHW: Tensor, boxes_BN4: Tensor, side: int, samples: int = 2) -> Tensor:
    """[B, N, C, side, side]: each box resampled to a side x side grid, `samples`^2 bilinear samples
    averaged per bin (RoIAlign, He et al. 2017, Mask R-CNN §3), in one grid_sample call."""
    B, N = boxes_BN4.shape[:2]
    C = image_BCHW.shape[1]
    n = side * samples
    t_n = (torch.arange(n, device=image_BCHW.device, dtype=torch.float32) + 0.5) / n
    x0, y0, x1, y1 = (boxes_BN4[..., i, None].float() for i in range(4))  # [B, N, 1]
    xs_BNn = x0 + (x1 - x0) * t_n
    ys_BNn = y0 + (y1 - y0) * t_n
    grid_BNnn2 = torch.stack([xs_BNn[:, :, None, :].expand(B, N, n, n),
                              ys_BNn[:, :, :, None].expand(B, N, n, n)], dim=-1) * 2 - 1
    crops = F.grid_sample(image_BCHW.float(), grid_BNnn2.reshape(B, N * n, n, 2), mode="bilinear",
                          padding_mode="border", align_corners=False)  # [B, C, N*n, n]
    crops = crops.view(B, C, N, n, n).transpose(1, 2).reshape(B * N, C, n, n)
    return F.avg_pool2d(crops, samples).view(B, N, C, side, side).to(image_BCHW.dtype)


def zero_boxes(image_BCHW: Tensor, boxes_BN4: Tensor, masked_BN: Tensor) -> Tensor:
    """The image with every pixel whose centre lies inside a masked box ([x0, x1) x [y0, y1),
    normalised xyxy) set to 0; pixels outside all masked boxes are untouched.

    VL-BERT (Su et al. 2020, §3.2, "masked RoI classification with linguistic clues") zeroes the
    masked RoI's pixels before its Fast R-CNN sees the image: zeroing the extracted feature alone
    would leave the content visible to every overlapping RoI (and to the whole-image one).
    Separable: [B,H,N] @ [B,N,W] counts the masked boxes covering each pixel without a [B,N,H,W] mask.
    """
    H, W = image_BCHW.shape[-2:]
    device = image_BCHW.device
    ys_H = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    xs_W = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    boxes = boxes_BN4.float()
    in_y_BNH = (boxes[..., 1, None] <= ys_H) & (ys_H < boxes[..., 3, None]) & masked_BN[..., None]
    in_x_BNW = (boxes[..., 0, None] <= xs_W) & (xs_W < boxes[..., 2, None])
    covered_BHW = in_y_BNH.float().transpose(1, 2) @ in_x_BNW.float() > 0
    return image_BCHW * ~covered_BHW[:, None]


class _CropPool(nn.Module):
    """Region features = the RoIAlign-pooled pixels of the box (a frozen, parameter-free extractor,
    standing in for the frozen detector features of BUTD)."""

    def __init__(self, blocks: Blocks, image: ImageSpec) -> None:
        super().__init__()
        self.side = blocks.region_pool
        self.feature_size = image.channels * self.side**2

    def forward(self, inputs: Mapping[str, Tensor], boxes_BN4: Tensor) -> Tensor:
        return roi_align(inputs["image"], boxes_BN4, self.side).flatten(2)


class _ConvStem(nn.Module):
    """Region features from a small conv stem over 4s x 4s RoIAlign crops, trained with the model
    (VL-BERT trains its Fast R-CNN jointly): two stride-2 3x3 convs, GELU, mean over the grid."""

    def __init__(self, blocks: Blocks, image: ImageSpec) -> None:
        super().__init__()
        self.side = 4 * blocks.region_pool
        width = self.feature_size = blocks.region_feature_size
        self.conv1 = nn.Conv2d(image.channels, width // 2 or 1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width // 2 or 1, width, 3, stride=2, padding=1)
        self.act = nn.GELU()

    def forward(self, inputs: Mapping[str, Tensor], boxes_BN4: Tensor) -> Tensor:
        crops_BNCss = roi_align(inputs["image"], boxes_BN4, self.side)
        B, N = crops_BNCss.shape[:2]
        h = self.act(self.conv2(self.act(self.conv1(crops_BNCss.flatten(0, 1)))))
        return h.mean(dim=(2, 3)).view(B, N, -1)


def _column(inputs: Mapping[str, Tensor], key: str, why: str) -> Tensor:
    if key not in inputs:
        raise ValueError(f"{why} needs the batch column {key!r}, which this batch lacks "
                         f"(columns: {', '.join(sorted(inputs))}); see jobs/data/batch.py")
    return inputs[key]


class RegionInput(VisualInput):
    """Object regions: feature + ViLBERT's 5-d box encoding, each projected, summed, normalised.

    Tokens are [whole image, object 1..R]: the whole-image region (ViLBERT's [IMG] token: its box is
    the full image) is always real, so every sample has a visual token to attend to. Boxes and
    classes are the scene's (`obj_boxes`/`obj_labels`) or the precomputed ones (`region_*`).
    """

    dense = False  # images have different numbers of objects: padded regions

    def __init__(self, cfg: ModelConfig, blocks: Blocks, image: ImageSpec) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.source = blocks.region_source
        self.extractor: nn.Module | None = None
        if self.source == "crop_pool":
            self.extractor = _CropPool(blocks, image)
        elif self.source == "conv_stem":
            self.extractor = _ConvStem(blocks, image)
        self.feature_size = blocks.region_feature_size if self.extractor is None else self.extractor.feature_size
        self.mask_pixels = blocks.mask_pixels and self.extractor is not None  # precomputed: no pixels
        self.feat_proj = nn.Linear(self.feature_size, D)
        self.box_proj = nn.Linear(5, D)
        self.norm = nn.LayerNorm(D)
        self.type_D = nn.Parameter(torch.zeros(D))
        self.dropout = nn.Dropout(cfg.dropout)

    def _scene(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        why = f"region input (region_source={self.source})"
        if self.source == "precomputed":
            return _column(inputs, "region_boxes", why), _column(inputs, "region_labels", why)
        return _column(inputs, "obj_boxes", why), _column(inputs, "obj_labels", why)

    def num_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        return 1 + self._scene(inputs)[0].shape[1]

    def forward(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None = None,
                generator: torch.Generator | None = None) -> VisualTokens:
        boxes_BR4, labels_BR = self._scene(inputs)
        B, R = labels_BR.shape
        device = boxes_BR4.device
        whole_B14 = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand(B, 1, 4)
        boxes_BN4 = torch.cat([whole_B14, boxes_BR4.float()], dim=1)
        loc_BN5 = box5(boxes_BN4)
        area_BN = loc_BN5[..., 4]
        mask_BN = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), area_BN[:, 1:] > 0], dim=1)
        labels_BN = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=device), labels_BR.long()], dim=1)
        masked_BN = _masked(visual_mask_BP, B, R + 1, device)
        if self.extractor is not None:
            source = inputs
            if self.mask_pixels and visual_mask_BP is not None:
                source = {**inputs, "image": zero_boxes(inputs["image"], boxes_BN4, masked_BN)}
            feats_BNF = self.extractor(source, boxes_BN4)
        else:
            feats_BRF = _column(inputs, "region_feats", "region input (region_source=precomputed)")
            if feats_BRF.shape[-1] != self.feature_size:
                raise ValueError(f"region_feats have {feats_BRF.shape[-1]} features; "
                                 f"model.region_feature_size={self.feature_size}")
            # ViLBERT's [IMG] token: the mean of the image's real region features.
            real_BR1 = mask_BN[:, 1:, None].to(feats_BRF.dtype)
            mean_B1F = (feats_BRF * real_BR1).sum(1, keepdim=True) / real_BR1.sum(1, keepdim=True).clamp(min=1)
            feats_BNF = torch.cat([mean_B1F, feats_BRF], dim=1)
        feats_BNF = feats_BNF.to(self.feat_proj.weight.dtype)
        if not self.mask_pixels:
            feats_BNF = feats_BNF * ~masked_BN[..., None]
        x_BND = self.norm(self.feat_proj(feats_BNF) + self.box_proj(loc_BN5.to(feats_BNF.dtype))) + self.type_D
        return VisualTokens(self.dropout(x_BND), feats_BNF, labels_BN, mask_BN, masked_BN)


class PixelInput(VisualInput):
    """Pixel-BERT (Huang et al. 2020): the cells of a CNN feature map are the visual tokens, the CNN
    trained end to end; in training a random `pixel_sample` share of cells is kept (§3.3: robustness
    and compute). log2(patch_size) stride-2 3x3 convs make a (H/p) x (W/p) grid of F channels."""

    def __init__(self, cfg: ModelConfig, blocks: Blocks, image: ImageSpec) -> None:
        super().__init__()
        if image.size % cfg.patch_size != 0:
            raise ValueError(f"image size {image.size} is not divisible by patch_size={cfg.patch_size}")
        D, width = cfg.hidden_size, blocks.pixel_channels
        self.image_size = image.size
        self.side = image.size // cfg.patch_size
        self.feature_size = width
        self.sample = blocks.pixel_sample
        convs: list[nn.Module] = []
        channels = image.channels
        for _ in range(cfg.patch_size.bit_length() - 1):
            convs += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU()]
            channels = width
        self.cnn = nn.Sequential(*convs)
        self.proj = nn.Linear(width, D)
        self.position_PD = nn.Parameter(torch.zeros(self.side**2, D))
        self.type_D = nn.Parameter(torch.zeros(D))
        self.dropout = nn.Dropout(cfg.dropout)

    def num_tokens(self, inputs: Mapping[str, Tensor]) -> int:
        return self.side**2

    def forward(self, inputs: Mapping[str, Tensor], visual_mask_BP: Tensor | None = None,
                generator: torch.Generator | None = None) -> VisualTokens:
        image_BCHW = inputs["image"]
        B, device = image_BCHW.shape[0], image_BCHW.device
        P = self.side**2
        feats_BPF = self.cnn(image_BCHW).flatten(2).transpose(1, 2)
        masked_BP = _masked(visual_mask_BP, B, P, device)
        feats_BPF = feats_BPF * ~masked_BP[..., None]
        x_BPD = self.proj(feats_BPF) + self.position_PD + self.type_D
        labels_BP = grid_labels(inputs, B, self.side, device)
        mask_BP = torch.ones(B, P, dtype=torch.bool, device=device)
        K = max(1, round(self.sample * P))
        if self.training and K < P:
            keep_BK = uniform((B, P), device, generator).argsort(dim=1)[:, :K].sort(dim=1).values
            x_BPD = x_BPD.gather(1, keep_BK[..., None].expand(-1, -1, x_BPD.shape[-1]))
            feats_BPF = feats_BPF.gather(1, keep_BK[..., None].expand(-1, -1, feats_BPF.shape[-1]))
            labels_BP, mask_BP, masked_BP = (t.gather(1, keep_BK) for t in (labels_BP, mask_BP, masked_BP))
        return VisualTokens(self.dropout(x_BPD), feats_BPF, labels_BP, mask_BP, masked_BP)


VisualBuilder = Callable[[ModelConfig, Blocks, ImageSpec], VisualInput]
VISUAL_INPUTS: dict[VisualKind, VisualBuilder] = {"patch": PatchInput, "region": RegionInput, "pixel": PixelInput}


def build_visual(cfg: ModelConfig, blocks: Blocks, image: ImageSpec) -> tuple[str, VisualInput]:
    """(attribute name, module): encoders register the input as `<kind>_embeddings`."""
    return f"{blocks.visual}_embeddings", VISUAL_INPUTS[blocks.visual](cfg, blocks, image)
