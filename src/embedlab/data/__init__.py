"""Data layer: records (and the one rule for a text's id), readers with exact error messages, sources built
from config, mixtures, the DataModule."""

from embedlab.data.errors import DataError
from embedlab.data.records import Example, ExampleIds, RetrievalTask, STSTask, example_ids, text_id
from embedlab.data.sources import BeirSource, STSSource, TableSource
from embedlab.data.texts import BeirTexts, FileTexts, HFTexts, STSTexts, TextCollection

__all__ = [
    "BeirSource",
    "BeirTexts",
    "FileTexts",
    "HFTexts",
    "STSTexts",
    "TextCollection",
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


def __getattr__(name: str):
    # the DataModule imports Lightning (seconds): loaded on first use, so readers and sources import fast
    if name == "EmbeddingDataModule":
        from embedlab.data.datamodule import EmbeddingDataModule

        return EmbeddingDataModule
    raise AttributeError(f"module 'embedlab.data' has no attribute {name!r}")
