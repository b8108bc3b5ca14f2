"""Datasets and transforms: ``build_datasets(name, ...) -> (train, val, test, num_classes, class_names)``.

``val`` is held out of the training data; ``test`` is the official test split (see ``datasets.py``).
"""
from .core import ArraySource, FileSource, ImageDataset, scan_files, stratified_sample, stratified_split
from .datasets import (DATASET_PRESETS, DATASETS, DEFAULT_PRESET, DatasetPreset, DatasetSplits, build_datasets,
                       get_preset, read_idx)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ToRGB, build_transforms, eval_transform, train_transform

__all__ = ["DATASETS", "DATASET_PRESETS", "DEFAULT_PRESET", "DatasetPreset", "DatasetSplits", "build_datasets",
           "get_preset", "read_idx", "ImageDataset", "ArraySource", "FileSource", "scan_files", "stratified_split",
           "stratified_sample", "build_transforms", "train_transform", "eval_transform", "ToRGB",
           "IMAGENET_MEAN", "IMAGENET_STD"]
