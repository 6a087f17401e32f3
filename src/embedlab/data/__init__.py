"""Data layer: records (and the one rule for a text's id), readers with exact error messages, sources built
from config, mixtures, the DataModule."""

from embedlab.data.datamodule import EmbeddingDataModule
from embedlab.data.errors import DataError
from embedlab.data.records import Example, ExampleIds, RetrievalTask, STSTask, example_ids, text_id
from embedlab.data.sources import BeirSource, STSSource, TableSource

__all__ = [
    "BeirSource",
    "DataError",
    "EmbeddingDataModule",
    "Example",
    "ExampleIds",
    "RetrievalTask",
    "STSSource",
    "STSTask",
    "TableSource",
    "example_ids",
    "text_id",
]
