"""`arc-easy`: ARC-Easy (test): grade-school science questions.

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `arc`);
online:
`load_dataset("allenai/ai2_arc", "ARC-Easy", split="test", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import arc, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "arc-easy",
    "1",
    "ARC-Easy (test): grade-school science questions",
    HubSource("allenai/ai2_arc", "ARC-Easy", "test"),
    arc,
    quality="acc",
)
