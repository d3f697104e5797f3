"""`hellaswag`: HellaSwag (validation): pick the ending of an activity description; acc_norm is the usual metric.

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `hellaswag`);
online:
`load_dataset("Rowan/hellaswag", None, split="validation", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import hellaswag, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "hellaswag",
    "1",
    "HellaSwag (validation): pick the ending of an activity description; acc_norm is the usual metric",
    HubSource("Rowan/hellaswag", None, "validation"),
    hellaswag,
    quality="acc_norm",
)
