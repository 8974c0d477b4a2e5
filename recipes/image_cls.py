"""Image classification (ViT, DeiT, ...) with a hadapeft adapter and a fresh head, on ``transformers.Trainer``.

Data: ``train_file`` (and ``eval_file``) as image folders with one sub-folder per class, or ``dataset:
sklearn_digits``: the 1,797 real 8x8 handwritten digits shipped with scikit-learn, offline. Images are resized to the
model's ``image_size`` and normalized with the model's image processor statistics (0.5/0.5 when the model folder has
no preprocessor_config.json).

    .venv/bin/accelerate launch -m recipes.image_cls --config recipes/configs/image_cls_smoke.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from recipes import classification, common
from recipes.loading import from_pretrained, resolve_model_path

NAME = "image_cls"
AUTO_CLASS = "AutoModelForImageClassification"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageDataArguments(classification.ClassificationDataArguments):
    image_size: Optional[int] = field(default=None, metadata={"help": "Default: the model config's image_size."})


def image_folder(root: str) -> list[dict]:
    """Rows ``{"image": (C, H, W) float in [0, 1], "label": class name (the sub-folder)}``."""
    import numpy as np
    from PIL import Image

    path = Path(root)
    if not path.is_dir():
        raise common.ConfigError(f"{root} is not an image folder (one sub-folder of images per class)")
    rows = []
    for cls in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
                rows.append({"image": torch.from_numpy(arr).permute(2, 0, 1), "label": cls.name})
    if not rows:
        raise common.ConfigError(f"{root} holds no images in class sub-folders")
    return rows


def sklearn_digits() -> list[dict]:
    """The 1,797 real 8x8 handwritten digits of scikit-learn as rows (1 channel, values in [0, 1])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    return [{"image": img, "label": str(int(y))} for img, y in zip(images, digits.target)]


def load_processor(m: common.ModelArguments):
    """The model's image processor if it has one (for its normalization), else None."""
    from transformers import AutoImageProcessor

    source = common._processor_source(m)
    if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
        return None
    return from_pretrained(AutoImageProcessor, source, revision=m.model_revision)


def pixels(images: list[torch.Tensor], processor, size: int) -> torch.Tensor:
    """(N, 3, size, size) normalized pixel values."""
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5] * 3).view(1, 3, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [0.5] * 3).view(1, 3, 1, 1)
    out = []
    for img in images:
        img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
        out.append(torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                                   align_corners=False)[0])
    return (torch.stack(out) - mean) / std


def read_rows(d: ImageDataArguments, seed: int) -> tuple[list[dict], list[dict]]:
    if d.dataset not in (None, "sklearn_digits"):
        raise common.ConfigError(f"dataset={d.dataset!r}: the built-in data set is sklearn_digits "
                                 f"(or set train_file to an image folder)")
    if d.dataset is None and not d.train_file:
        raise common.ConfigError("train_file (an image folder) or dataset is not set")
    if d.dataset:
        return common.read_splits(d, seed, sklearn_digits())
    train = image_folder(d.train_file)
    if d.eval_file:
        return train[:d.max_train_samples], image_folder(d.eval_file)[:d.max_eval_samples]
    return common.read_splits(d, seed, train)


def build_trainer(model_args, adapter: Optional[dict], data_args: ImageDataArguments, args):
    """(``transformers.Trainer``, RunInfo) for the images of ``data_args``."""
    from transformers import AutoConfig, default_data_collator

    d = data_args
    train, held = read_rows(d, args.seed)
    processor = load_processor(model_args)
    size = d.image_size or from_pretrained(AutoConfig, resolve_model_path(model_args.model_name_or_path),
                                           revision=model_args.model_revision).image_size
    names = classification.label_names([r["label"] for r in train], d.labels)

    def encode(rows, where):
        if not rows:
            return []
        ids = classification.label_ids(names, [r["label"] for r in rows], where)
        return [{"pixel_values": px, "labels": y} for px, y in zip(pixels([r["image"] for r in rows], processor,
                                                                          size), ids)]

    # peft has no image task type: the head is trained and saved through modules_to_save
    return classification.build_trainer(
        model_args, adapter, d, args, recipe=NAME, auto_class=AUTO_CLASS, names=names, train=encode(train, "train"),
        held=encode(held, "eval"), collator=default_data_collator, adapter_defaults={"modules_to_save": ["classifier"]},
        processor=processor)


def parse(argv=None) -> tuple:
    """(ModelArguments, AdapterArguments, ImageDataArguments, TrainingArguments) from ``--config`` and flags."""
    return classification.parse(NAME, ImageDataArguments, argv)


def main(argv=None) -> common.Result:
    model_args, adapter_args, data_args, args = parse(argv)
    trainer, run = build_trainer(model_args, adapter_args.adapter, data_args, args)
    return common.fit(trainer, run)


if __name__ == "__main__":
    main()
