"""Hub settings: SlimBench runs offline unless the user says otherwise."""

from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")


def offline_defaults() -> None:
    """No hub traffic by default: everything SlimBench ships runs offline.

    Users who want hub models and data sets export ``HF_HUB_OFFLINE=0``. ``datasets`` has a
    switch of its own, ``HF_DATASETS_OFFLINE``, which wins over ``HF_HUB_OFFLINE`` when set: it
    follows the user's ``HF_HUB_OFFLINE`` unless the user set it too, so one variable turns the
    hub on for models and data alike.
    """
    hub = os.environ.get("HF_HUB_OFFLINE")
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1" if hub is None else hub),
        ("HF_UPDATE_DOWNLOAD_COUNTS", "0"),
        ("TOKENIZERS_PARALLELISM", "false"),
        # transformers, given a model with only pytorch_model.bin, starts a thread that asks a
        # Space outside HF_ENDPOINT to convert it (sending the token); a benchmark asks no one.
        ("DISABLE_SAFETENSORS_CONVERSION", "1"),
    ):
        os.environ.setdefault(key, value)


def hub_offline() -> bool:
    """Whether hub downloads are off (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in TRUE


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
