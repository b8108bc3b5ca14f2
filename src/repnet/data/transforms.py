"""Image transforms of the Rep-Net / TinyTL recipe (docs/recipes.md).

train: RandomResizedCrop(R, scale=(0.22, 1)) + RandomHorizontalFlip (+ ColorJitter(0.4, 0.4, 0.4, 0.1)
       where the dataset's preset asks for it: Aircraft, Cars)
test:  Resize(ceil(R / 0.875)) + CenterCrop(R)
both:  ToTensor + Normalize(mean, std) with the *backbone's* statistics (passed in by the caller).

Every pipeline starts with :class:`ToRGB`, so greyscale sources (Fashion-MNIST, MNIST, digits)
come out as 3-channel images the ImageNet backbones expect.
"""
from __future__ import annotations

import math
from typing import Sequence

from torchvision import transforms as T

from repnet.errors import RepnetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: RandomResizedCrop scale range of the released code.
CROP_SCALE = (0.22, 1.0)
#: Test-time resize factor: Resize(ceil(R / 0.875)) then CenterCrop(R).
CENTER_CROP_RATIO = 0.875
#: ColorJitter(brightness, contrast, saturation, hue) used for Aircraft and Cars.
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)


class ToRGB:
    """PIL image -> 3-channel RGB (greyscale digits/clothes become grey RGB). Picklable for workers."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _check(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise RepnetError(f"image_size must be a positive integer, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise RepnetError(f"mean and std need 3 values (RGB), got mean={tuple(mean)} std={tuple(std)}")
    if any(s <= 0 for s in std):
        raise RepnetError(f"std values must be positive, got {tuple(std)}")


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Resize(ceil(R/0.875)) + CenterCrop(R) + ToTensor + Normalize: validation and test images."""
    _check(image_size, mean, std)
    return T.Compose([
        ToRGB(),
        T.Resize(int(math.ceil(image_size / CENTER_CROP_RATIO))),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


test_transform = eval_transform  # the recipe's name for it
eval_transform.__test__ = False  # not a pytest test, despite the alias's name


def train_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, color_jitter: bool = False,
                    hflip: bool = True) -> T.Compose:
    """RandomResizedCrop(R, scale=(0.22, 1)) + horizontal flip (+ colour jitter) + ToTensor + Normalize."""
    _check(image_size, mean, std)
    steps = [ToRGB(), T.RandomResizedCrop(image_size, scale=CROP_SCALE)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter:
        steps.append(T.ColorJitter(*COLOR_JITTER))
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


AUGMENT_CHOICES = ("preset", "none", "basic", "jitter")


def build_transforms(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, augment: bool | str | None = None,
                     color_jitter: bool = False, hflip: bool = True) -> tuple[T.Compose, T.Compose]:
    """Return ``(train_transform, eval_transform)``.

    ``augment``: ``None``/``True``/``"preset"`` -> crop + flip (+ jitter if ``color_jitter``: the dataset's);
    ``False``/``"none"`` -> no augmentation (training images get the test transform; the quick demo);
    ``"basic"`` -> crop + flip without jitter; ``"jitter"`` -> crop + flip + jitter. Flips only where
    ``hflip`` (the dataset allows them).
    """
    mode = {None: "preset", True: "preset", False: "none"}.get(augment, augment) \
        if not isinstance(augment, str) else augment.lower()
    if mode not in AUGMENT_CHOICES:
        raise RepnetError(f"augment must be one of {', '.join(AUGMENT_CHOICES)} (or true/false), got {augment!r}")
    eval_tf = eval_transform(image_size, mean, std)
    if mode == "none":
        return eval_tf, eval_tf
    jitter = {"preset": color_jitter, "basic": False, "jitter": True}[mode]
    return train_transform(image_size, mean, std, color_jitter=jitter, hflip=hflip), eval_tf
