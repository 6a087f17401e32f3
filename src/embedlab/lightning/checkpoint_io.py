"""Checkpoint files that are whole or absent, read without running code: Lightning's checkpoint I/O for embedlab.

Lightning writes a checkpoint (``best.ckpt``, ``last.ckpt``, every N steps) straight to its final name, so a
process killed during the write (pre-emption, out of memory, Ctrl-C twice) leaves a truncated file where the
last good one was, and the resume that follows fails to unpickle it. :class:`SafeCheckpointIO` writes a
temporary sibling and renames it over the final name (:func:`embedlab.atomic.atomic_file`): after a crash the
previous checkpoint is still there, complete.

Reading goes through :func:`embedlab.models.checkpoint.safe_load` (``weights_only`` unpickling with
embedlab's allow-list), as every checkpoint read in embedlab does: ``trainer.fit(ckpt_path=...)`` on a
downloaded file cannot run its author's code. A ``weights_only`` argument Lightning passes is therefore
ignored: the restricted unpickler is always used.

Configured in ``configs/trainer/default.yaml`` (``plugins``), which every trainer config inherits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from embedlab.atomic import atomic_file
from embedlab.models.checkpoint import safe_load


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves (temporary file + ``os.replace``) and allow-listed loads.

    Remote paths (``s3://...``; fsspec) have no rename-over to rely on: they are written by Lightning's own
    method, unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            # TorchCheckpointIO raises its own message for storage_options and handles fsspec paths
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | str | torch.device | None = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return safe_load(path, map_location=map_location)
