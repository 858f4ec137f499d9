"""Pushing adapters to the Hugging Face Hub (:mod:`.push`: ``push_adapter``). The model card is a file of the adapter
folder and lives with the file tools (:mod:`peft_prefix_plus.files.card`); this package only pushes."""

from .push import push_adapter

__all__ = ["push_adapter"]
