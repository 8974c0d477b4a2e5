"""Image classification (ViT, DeiT, ...) with a hadapeft adapter and a fresh head (trained and saved with it).

Data: ``data.train_file`` (and ``eval_file``) as image folders with one sub-folder per class, or
``data.dataset: sklearn_digits``: the 1,797 real 8x8 handwritten digits shipped with scikit-learn, offline. Images are
resized to the model's ``image_size`` and normalized with the model's image processor statistics (0.5/0.5 when the
model folder has no preprocessor_config.json).

    accelerate launch recipes/image_cls.py --config recipes/configs/image_cls_smoke.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file (accelerate launch recipes/image_cls.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recipes.common import ClassificationData, ClassificationRecipe, ConfigError, Data, main, split_eval  # noqa: E402
from recipes.loading import from_pretrained, resolve_model_path  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageData(ClassificationData):
    image_size: Optional[int] = None  # default: the model config's image_size


def image_folder(root: str) -> list[dict]:
    """Rows ``{"image": (C, H, W) float in [0, 1], "label": class name (the sub-folder)}``."""
    import numpy as np
    from PIL import Image

    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"{root} is not an image folder (one sub-folder of images per class)")
    rows = []
    for cls in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
                rows.append({"image": torch.from_numpy(arr).permute(2, 0, 1), "label": cls.name})
    if not rows:
        raise ConfigError(f"{root} holds no images in class sub-folders")
    return rows


def sklearn_digits() -> list[dict]:
    """The 1,797 real 8x8 handwritten digits of scikit-learn as rows (1 channel, values in [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    return [{"image": img, "label": str(int(y))} for img, y in zip(images, digits.target)]


class ImageClsRecipe(ClassificationRecipe):
    """Image classification (ViT family) with a fresh head."""

    name = "image_cls"
    task_type = None  # peft has no image task type: the head is trained through modules_to_save instead
    auto_class = "AutoModelForImageClassification"
    data_args = ImageData
    default_adapter = {"type": "gated_lora", "r": 8, "lora_alpha": 16}

    def load_processor(self, cfg):
        """The model's image processor if it has one (for its size and normalization), else None."""
        from transformers import AutoImageProcessor

        source = self._processor_source(cfg)
        if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
            return None
        return from_pretrained(AutoImageProcessor, source, revision=cfg.model.revision)

    def pixels(self, images: list[torch.Tensor], processor, size: int) -> torch.Tensor:
        """(N, 3, size, size) normalized pixel values."""
        mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5] * 3).view(1, 3, 1, 1)
        std = torch.tensor(getattr(processor, "image_std", None) or [0.5] * 3).view(1, 3, 1, 1)
        out = []
        for img in images:
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            out.append(torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                                       align_corners=False)[0])
        return (torch.stack(out) - mean) / std

    def read_splits(self, cfg) -> tuple[list[dict], list[dict]]:
        d = cfg.data
        if d.dataset not in (None, "sklearn_digits"):
            raise ConfigError(f"data.dataset={d.dataset!r}: the built-in data set is sklearn_digits "
                              f"(or set train_file to an image folder)")
        if d.dataset is None and not d.train_file:
            raise ConfigError("data.train_file (an image folder) or data.dataset is not set")
        rows = sklearn_digits() if d.dataset else image_folder(d.train_file)
        if d.eval_file and not d.dataset:
            train, held = rows, image_folder(d.eval_file)
        else:
            train, held = split_eval(rows, d.eval_size, cfg.seed)
        return train[:d.max_train_samples], held[:d.max_eval_samples]

    def load_data(self, cfg, processor) -> Data:
        from transformers import AutoConfig

        train, held = self.read_splits(cfg)
        size = cfg.data.image_size or from_pretrained(
            AutoConfig, resolve_model_path(cfg.model.name_or_path), revision=cfg.model.revision).image_size
        names = self.label_map(cfg, [r["label"] for r in train])

        def encode(rows, where):
            if not rows:
                return []
            ids = self.label_ids(names, [r["label"] for r in rows], where)
            pixels = self.pixels([r["image"] for r in rows], processor, size)
            return [{"pixel_values": px, "label": y} for px, y in zip(pixels, ids)]

        return Data(encode(train, "train"), encode(held, "eval"), {"labels": names})

    def adapter_defaults(self, cfg, data) -> dict:
        return {"modules_to_save": ["classifier"]}

    def collate(self, examples: list[dict]) -> dict:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}


if __name__ == "__main__":
    main(ImageClsRecipe)
