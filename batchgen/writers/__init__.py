"""Output layouts behind one writer interface: one object per image, WebDataset tar shards, Parquet shards."""

from batchgen.writers.base import Layout, Writer, layout_for, stored_layout

__all__ = ["Layout", "Writer", "layout_for", "stored_layout"]
