"""Data: files -> rows -> text pairs -> token pairs -> forward batches."""
