"""Hub settings: SlimBench runs offline unless the user says otherwise."""

from __future__ import annotations

import os


def offline_defaults() -> None:
    """No hub traffic by default: everything SlimBench ships runs offline.

    Users who want hub models export HF_HUB_OFFLINE=0 themselves.
    """
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_UPDATE_DOWNLOAD_COUNTS", "0"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
