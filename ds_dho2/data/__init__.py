"""Offline data sets and the bundled pretrained model used by recipes, tests and benchmarks."""

from .datasets import load_digits_split, load_sms_spam, load_sst2, load_tinyshakespeare
from .paths import DATA_DIR_ENV, minilm_path, shared_data_dir
from .text import CharTokenizer, char_lm_blocks

__all__ = [
    "DATA_DIR_ENV",
    "CharTokenizer",
    "char_lm_blocks",
    "load_digits_split",
    "load_sms_spam",
    "load_sst2",
    "load_tinyshakespeare",
    "minilm_path",
    "shared_data_dir",
]
