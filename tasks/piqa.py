"""`piqa`: PIQA (validation): physical commonsense, 2 solutions.

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `piqa`);
online:
`load_dataset("baber/piqa", None, split="validation", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import piqa, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "piqa",
    "1",
    "PIQA (validation): physical commonsense, 2 solutions",
    HubSource("baber/piqa", None, "validation"),
    piqa,
    quality="acc",
)
