"""Data layer: text classification and causal-LM datasets, loaders, splits and client partitioners.

The public names are re-exported here so callers can write
``from secure_fl.data import load_bbc_news, partition``.
"""

from __future__ import annotations

from .datasets import DataError, TextDataset, load_bbc_news, load_text_file, make_synthetic
from .instructions import InstructionDataset, load_instruction_file, make_synthetic_instructions
from .partition import PARTITION_METHODS, partition, partition_dirichlet, partition_iid, train_test_split

__all__ = [
    "PARTITION_METHODS",
    "DataError",
    "InstructionDataset",
    "TextDataset",
    "load_bbc_news",
    "load_instruction_file",
    "load_text_file",
    "make_synthetic",
    "make_synthetic_instructions",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "train_test_split",
]
