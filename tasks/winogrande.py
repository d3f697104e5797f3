"""`winogrande`: WinoGrande (xl, validation): fill the blank with one of two options (partial scoring).

lm-evaluation-harness 0.4 prompt and scoring (see `tasks/_zero_shot.py`, builder `winogrande`);
online:
`load_dataset("allenai/winogrande", "winogrande_xl", split="validation", revision=<pinned commit>)`;
offline: `path` to a local file with the same fields.
"""

from slimbench.tasks._zero_shot import winogrande, zero_shot_task

from slimbench.zoo.datasets.readers import HubSource

TASK = zero_shot_task(
    "winogrande",
    "1",
    "WinoGrande (xl, validation): fill the blank with one of two options (partial scoring)",
    HubSource("allenai/winogrande", "winogrande_xl", "validation"),
    winogrande,
    quality="acc",
)
