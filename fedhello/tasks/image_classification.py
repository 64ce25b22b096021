"""Image classification: a vision transformer (ViT, DeiT, ...) with a new head over the classes.

Images come from `fedhello/data/images.py` (decoded once, kept at native size in a memory-mapped
cache) and become model inputs per batch (`fedhello/data/transforms.py`), with the model's image
processor settings, plus a seeded random resized crop and flip while training when
`data.augment` is on. Metrics and the Fisher objective are those of every classification task
(`fedhello/tasks/classification.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.data.images import ImageExamples, load_image_examples
from fedhello.data.transforms import ImagePreprocessing
from fedhello.tasks import register_task
from fedhello.tasks.base import Examples
from fedhello.tasks.classification import Classification


@register_task
class ImageClassification(Classification):
    name = "image-classification"
    export_auto_class = "AutoModelForImageClassification"

    preprocessing: ImagePreprocessing | None = None
    processor: Any = None  # the checkpoint's image processor, if it has one

    def load_examples(self) -> ImageExamples:
        return load_image_examples(self.cfg.data, seed=self.cfg.seed)

    def load_model(self, examples: Examples) -> nn.Module:
        from fedhello.models import load_image_classifier

        model, processor = load_image_classifier(
            self.cfg.model, examples.label_names, self.cfg.seed, device=self.cfg.device
        )
        self.processor = processor
        self.pretrained = self.cfg.model.architecture is None
        config = model.config
        channels = int(getattr(config, "num_channels", 3))
        augment, min_scale = self.cfg.data.augment, self.cfg.data.augment_min_scale
        if processor is not None:
            self.preprocessing = ImagePreprocessing.from_processor(
                processor, channels, augment=augment, min_scale=min_scale
            )
        else:
            size = getattr(config, "image_size", 224)
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            self.preprocessing = ImagePreprocessing(
                int(height), int(width), channels, augment=augment, min_scale=min_scale
            )
        return model

    def encode(self, examples: Examples) -> ImageExamples:
        assert isinstance(examples, ImageExamples)
        return examples  # already decoded; resizing and normalising happen per batch

    def lengths(self, data: ImageExamples) -> np.ndarray:
        """Pixels per image: evaluation batches images of similar size together."""
        shapes = data.images.shapes
        return shapes[:, 0] * shapes[:, 1]

    def collate(
        self,
        data: ImageExamples,
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        assert self.preprocessing is not None, "load_model sets the preprocessing"
        rows = np.asarray(indices, dtype=np.int64)
        pixels = self.preprocessing([data.images.image(int(i)) for i in rows], generator)
        return {"pixel_values": pixels, "labels": torch.from_numpy(data.labels[rows])}

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"pixel_values": batch["pixel_values"]}

    def summary_notes(self, examples: Examples) -> dict[str, Any]:
        skipped = examples.skipped if isinstance(examples, ImageExamples) else []
        return {"pretrained": self.pretrained, "skipped_images": len(skipped)}

    def save_preprocessing(self, folder: Path) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(folder)
