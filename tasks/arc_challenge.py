"""`arc-challenge`: ARC-Challenge (test): the hard ARC questions; acc_norm is the usual metric.

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `arc`);
online:
`load_dataset("allenai/ai2_arc", "ARC-Challenge", split="test", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import arc, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "arc-challenge",
    "1",
    "ARC-Challenge (test): the hard ARC questions; acc_norm is the usual metric",
    HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
    arc,
    quality="acc_norm",
)
