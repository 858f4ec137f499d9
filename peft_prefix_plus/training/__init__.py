"""Training tools: adapter-only, atomic checkpoints with Accelerate (:mod:`.checkpointing`)."""

from ..errors import CheckpointError
from .checkpointing import (
    list_checkpoints,
    load_checkpoint,
    register_adapter_checkpointing,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "list_checkpoints",
    "load_checkpoint",
    "register_adapter_checkpointing",
    "remove_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
]
