"""Data: loading labelled texts, splitting, partitioning among clients, tokenizing."""

from fedhello.data.partition import (
    describe_partition,
    format_partition_table,
    partition_dirichlet,
    partition_iid,
    partition_indices,
    partition_pathological,
)
from fedhello.data.sources import TextExamples, load_examples, split_examples
from fedhello.data.tokenize import TokenizedExamples, pad_batch, tokenize_examples

__all__ = [
    "TextExamples",
    "TokenizedExamples",
    "describe_partition",
    "format_partition_table",
    "load_examples",
    "pad_batch",
    "partition_dirichlet",
    "partition_iid",
    "partition_indices",
    "partition_pathological",
    "split_examples",
    "tokenize_examples",
]
