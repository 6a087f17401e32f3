"""Data layer: records, readers with exact error messages, sources built from config, the DataModule."""

from embedlab.data.datamodule import EmbeddingDataModule
from embedlab.data.errors import DataError
from embedlab.data.records import Example, RetrievalTask, STSTask
from embedlab.data.sources import BeirSource, STSSource, TableSource

__all__ = ["BeirSource", "DataError", "EmbeddingDataModule", "Example", "RetrievalTask", "STSSource", "STSTask", "TableSource"]
