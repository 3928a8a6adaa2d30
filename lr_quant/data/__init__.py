"""Data for fine-tuning, built on timm's data pipeline.

- config: the recipe's ``data:`` section (DataConfig).
- sources: the raw splits of a data set (``timm.data.create_dataset``: folders / tar,
  torchvision, Hugging Face datasets; the bundled digits).
- transforms: the model's data config (``timm.data.resolve_data_config``) and the train / eval
  transforms (``timm.data.create_transform``).
- datasets: train / validation (carved from train) / test sets (``build_datasets``).
- mixing: mixup / cutmix batches (``timm.data.Mixup``).
"""

from .config import DataConfig
from .datasets import Datasets, build_datasets, dataset_labels
from .digits import digits_images, digits_split
from .images import DataError, load_image
from .mixing import batch_mixer
from .sources import DataSource, open_source
from .transforms import describe, image_transform, resolve, timm_data_config

__all__ = ["DataConfig", "Datasets", "build_datasets", "dataset_labels", "digits_images",
           "digits_split", "DataError", "load_image", "batch_mixer", "DataSource", "open_source",
           "describe", "image_transform", "resolve", "timm_data_config"]
