"""Images to model inputs, one batch at a time: resize, crop, flip, normalise (in torch).

The settings come from the model's image processor (its size, crop size, mean, std, rescale
factor and resampling), so a hub model sees inputs prepared the way it was trained. The
arithmetic is done here on tensors rather than by the processor itself because images are
kept at their native size (fedhello/data/images.py) and training augmentation (a random resized
crop and a horizontal flip) must draw from the run's seeded generator. Evaluation is
deterministic: resize (shortest edge, or to a fixed height x width), then a centre crop where
the processor has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as PIL's convert("L"), for models that expect one channel
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a native-size uint8 image becomes a model input of `channels` x `height` x `width`."""

    height: int  # model input height and width (after the centre crop, if any)
    width: int
    channels: int
    resize: tuple[int, int] | int | None = None  # (h, w) exactly, or the shorter side; None = (height, width)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255
    bicubic: bool = False
    augment: bool = False
    min_scale: float = 0.08  # smallest random crop, as a fraction of the image's area

    @classmethod
    def from_processor(cls, processor: Any, channels: int, **options: Any) -> ImagePreprocessing:
        """Read the settings of a transformers image processor (ViT, DeiT, CLIP, ConvNeXt, ...)."""
        size = getattr(processor, "size", None)

        def get(key: str) -> Any:
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

        resize: tuple[int, int] | int | None
        if isinstance(size, int):
            resize = (size, size)
        elif get("height") and get("width"):
            resize = (int(get("height")), int(get("width")))
        elif get("shortest_edge"):
            resize = int(get("shortest_edge"))
        else:
            raise ValueError(f"image processor {type(processor).__name__} gives no input size")
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        if crop:
            crop_h: Any = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
            crop_w: Any = crop.get("width") if isinstance(crop, dict) else getattr(crop, "width", None)
            height, width = int(crop_h), int(crop_w)
        elif isinstance(resize, tuple):
            height, width = resize
        else:
            height = width = resize  # shorter side resized, then a square centre crop
        normalize = getattr(processor, "do_normalize", True)
        mean = getattr(processor, "image_mean", None) if normalize else None
        std = getattr(processor, "image_std", None) if normalize else None
        rescale = (
            getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
        )
        return cls(
            height=height,
            width=width,
            channels=channels,
            resize=resize,
            mean=tuple(float(x) for x in mean) if mean is not None else (0.0,) * 3,
            std=tuple(float(x) for x in std) if std is not None else (1.0,) * 3,
            rescale=float(rescale),
            bicubic=int(getattr(processor, "resample", 2) or 2) == 3,
            **options,
        )

    def __call__(self, images: Sequence[np.ndarray], generator: torch.Generator | None = None) -> Tensor:
        """A float batch (n, channels, height, width); augmented when `generator` is given and
        augmentation is on."""
        augment = self.augment and generator is not None
        out = torch.empty(len(images), self.channels, self.height, self.width)
        for i, image in enumerate(images):
            x = self._channels(torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1))
            if augment:
                assert generator is not None
                x = self._random_crop(x, generator)
                if torch.rand((), generator=generator) < 0.5:
                    x = x.flip(-1)
            else:
                x = self._resize_and_crop(x)
            out[i] = x
        out.mul_(self.rescale)
        mean = torch.tensor(self._per_channel(self.mean))[:, None, None]
        std = torch.tensor(self._per_channel(self.std))[:, None, None]
        return out.sub_(mean).div_(std)

    def _per_channel(self, values: tuple[float, ...]) -> list[float]:
        if len(values) == self.channels:
            return list(values)
        return [sum(values) / len(values)] * self.channels  # e.g. RGB statistics for a 1-channel model

    def _channels(self, x: Tensor) -> Tensor:
        if x.shape[0] == self.channels:
            return x
        if x.shape[0] == 1:
            return x.expand(self.channels, -1, -1)
        grey = (x[:3] * _LUMA[:, None, None]).sum(0, keepdim=True)
        return grey.expand(self.channels, -1, -1)

    def _resize(self, x: Tensor, height: int, width: int) -> Tensor:
        if x.shape[1:] == (height, width):
            return x
        mode = "bicubic" if self.bicubic else "bilinear"
        resized = F.interpolate(x[None], size=(height, width), mode=mode, antialias=True, align_corners=False)
        return resized[0].clamp_(0, 255)

    def _resize_and_crop(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:]
        if self.resize is None or isinstance(self.resize, tuple):
            target = self.resize or (self.height, self.width)
            x = self._resize(x, target[0], target[1])
        else:
            scale = self.resize / min(h, w)
            x = self._resize(x, max(self.height, round(h * scale)), max(self.width, round(w * scale)))
        top = (x.shape[1] - self.height) // 2
        left = (x.shape[2] - self.width) // 2
        return x[:, top : top + self.height, left : left + self.width]

    def _random_crop(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """torchvision's RandomResizedCrop: area in [min_scale, 1], aspect ratio in [3/4, 4/3]
        (log-uniform), ten tries, else a centre crop of the whole image."""
        h, w = x.shape[1:]
        area = h * w
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            target = area * (self.min_scale + (1 - self.min_scale) * u[0])
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(u[2] * (h - ch + 1))
                left = int(u[3] * (w - cw + 1))
                return self._resize(x[:, top : top + ch, left : left + cw], self.height, self.width)
        return self._resize(x, self.height, self.width)
