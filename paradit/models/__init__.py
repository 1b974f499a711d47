"""The Wan DiT (parallelism-agnostic), checkpoint loading, and component adapters."""
from paradit.models.loading import CheckpointError, load_transformer
from paradit.models.transformer import WanTransformer, patchify, unpatchify

__all__ = ["WanTransformer", "load_transformer", "CheckpointError", "patchify", "unpatchify"]
