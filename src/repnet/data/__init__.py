"""Datasets and transforms: ``build_datasets(name, ...) -> (train, val, test, num_classes, class_names)``.

``val`` is held out of the training data; ``test`` is the official test split (see ``datasets.py``).
The registry ``DATASETS`` holds the offline sets (Fashion-MNIST, MNIST-5k, digits), the paper's eight
(read from ``data_root`` in the TinyTL ImageFolder layout or their native files) and
``imagefolder:<path>``; ``DATASET_INFO`` is what is known of each before reading it (classes, flips).
"""
from repnet.data.core import ArraySource, FileSource, ImageDataset, scan_files, stratified_sample, stratified_split
from repnet.data.datasets import (DATASET_INFO, DATASETS, DatasetInfo, DatasetSplits,
                                  build_datasets, dataset_info, read_idx)
from repnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ToRGB, build_transforms, eval_transform, train_transform

__all__ = ["DATASETS", "DATASET_INFO", "DatasetInfo", "DatasetSplits", "build_datasets",
           "dataset_info", "read_idx", "ImageDataset", "ArraySource", "FileSource", "scan_files", "stratified_split",
           "stratified_sample", "build_transforms", "train_transform", "eval_transform", "ToRGB",
           "IMAGENET_MEAN", "IMAGENET_STD"]
