"""The Hugging Face Hub: model cards (:mod:`.card`: built on ``huggingface_hub.ModelCard`` and PEFT's card writer)
and pushing adapters (:mod:`.push`: ``push_adapter``, ``HubPushError``, the ``PeftModel`` hooks).

``push_adapter`` and ``HubPushError`` are also exported by ``peft_prefix_plus``. This package imports nothing itself:
the adapter-file tools write cards through :mod:`.card`, and :mod:`.push` reads adapters through them.
"""
