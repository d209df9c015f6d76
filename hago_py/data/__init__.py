"""Data readers: model input specs, calibration / validation datasets, image folders."""
from hago_py.data.readers import (
    IMAGE_EXTENSIONS,
    ArrayDataset,
    Dataset,
    ImageFolder,
    InputSpec,
    IterableDataset,
    Preprocess,
    iterate_batches,
    load_calibration,
    model_input_specs,
    static_batch_size,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "Dataset",
    "ImageFolder",
    "InputSpec",
    "IterableDataset",
    "Preprocess",
    "iterate_batches",
    "load_calibration",
    "model_input_specs",
    "static_batch_size",
]
