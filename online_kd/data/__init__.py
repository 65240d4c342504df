"""Data: splits addressable by sample index, seeded augmentation and deterministic batch streams.

Every peer of a topology trains on the SAME batches: the order of an epoch depends
only on (seed, epoch) and a sample's augmentation only on (seed, epoch, index), so
any number of peers, shards or loader threads see identical data.

Files: ``info`` (metadata without I/O), ``datasets`` (splits), ``augment``
(seeded augmentation), ``hashing`` (counter-based randomness), ``stream``
(batches and shards), ``prefetch`` (loading them ahead in worker processes), ``builder``
(``build_data``), ``errors`` (``DataError``).
"""
from .augment import BatchTransform, PadCropFlip, RandomResizedCropFlip
from .builder import DataBundle, build_data
from .datasets import ImageFolderDataset, IndexedDataset, SyntheticDataset, TensorDataset, stratified_split
from .errors import DataError
from .info import NORMALIZATION, DatasetInfo, dataset_info
from .stream import Batch, BatchStream

__all__ = [
    "Batch", "BatchStream", "BatchTransform", "DataBundle", "DataError", "DatasetInfo", "ImageFolderDataset",
    "IndexedDataset", "NORMALIZATION", "PadCropFlip", "RandomResizedCropFlip", "SyntheticDataset",
    "TensorDataset", "build_data", "dataset_info", "stratified_split",
]
