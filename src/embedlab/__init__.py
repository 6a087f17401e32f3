"""embedlab: train, fine-tune, distill and evaluate text embedding models for retrieval."""

from embedlab.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
