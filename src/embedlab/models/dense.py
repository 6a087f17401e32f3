"""A linear layer after pooling, in sentence-transformers' ``Dense`` format (``2_Dense/``).

Two uses:

- loading sentence-transformers models that have one (e.g. LaBSE's ``Dense`` with ``Tanh``);
- a square, orthogonal *rotation* before truncation for Matryoshka training (``model.projection_dim=384``):
  a rotation leaves every cosine similarity at the full width unchanged, while it decides which directions
  the leading ``k`` dims hold. :func:`embedlab.lightning.callbacks.PCAProjectionInit` sets it to the principal
  axes of the training texts' embeddings, so truncation starts out as PCA: the leading ``k`` dims keep the
  most variance any ``k`` orthogonal directions can, before any training.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from embedlab.errors import ConfigError

IDENTITY = "torch.nn.modules.linear.Identity"


def _activation(path: str) -> nn.Module:
    """An activation module from its class path; only ``torch.nn`` classes (as sentence-transformers without
    ``trust_remote_code``)."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise ConfigError(f"Dense activation_function must be a torch.nn module class path, got {path!r}")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"Dense activation_function {path!r} is not a torch.nn.Module class")
    return cls()


class Dense(nn.Module):
    """``activation(x @ W.T + b)``: ``(B, in_features)`` -> ``(B, out_features)``.

    Initialized to the (truncated) identity, so adding one to a trained model changes nothing until it is
    trained or set (e.g. to a PCA rotation).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, activation_function: str = IDENTITY
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(int(in_features), int(out_features), bias=bool(bias))
        self.activation_name = activation_function
        self.activation_function = _activation(activation_function)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(int(out_features), int(in_features)))
            if self.linear.bias is not None:
                self.linear.bias.zero_()

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.linear(embeddings))

    def save(self, folder: Path) -> None:
        """``config.json`` + ``model.safetensors`` (key ``linear.weight``) as sentence-transformers writes them."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.linear.bias is not None,
            "activation_function": self.activation_name,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {f"linear.{k}": v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> "Dense":
        """Read a sentence-transformers ``Dense`` folder (``model.safetensors`` or ``pytorch_model.bin``)."""
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: Dense module config not found")
        config = json.loads(config_path.read_text())
        missing = [k for k in ("in_features", "out_features") if k not in config]
        if missing:
            raise ValueError(f"{config_path}: Dense config lacks {', '.join(missing)}")
        dense = cls(
            config["in_features"],
            config["out_features"],
            bias=config.get("bias", True),  # sentence-transformers' default
            activation_function=config.get("activation_function", "torch.nn.modules.activation.Tanh"),
        )
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / "model.safetensors"))
        elif (folder / "pytorch_model.bin").is_file():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder}: Dense module has neither model.safetensors nor pytorch_model.bin")
        dense.linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items() if k.startswith("linear.")})
        return dense
