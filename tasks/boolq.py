"""`boolq`: BoolQ (SuperGLUE, validation): yes/no question about a passage.

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `boolq`);
online:
`load_dataset("aps/super_glue", "boolq", split="validation", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import boolq, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "boolq",
    "1",
    "BoolQ (SuperGLUE, validation): yes/no question about a passage",
    HubSource("aps/super_glue", "boolq", "validation"),
    boolq,
    quality="acc",
)
