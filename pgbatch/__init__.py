"""pgbatch: batch image annotation with PaliGemma on Ray Data, written as typed Parquet."""
__version__ = "0.1.0"
