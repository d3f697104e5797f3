"""`niah-multikey`: four needles with different keys, one queried (RULER ``niah_multikey_1``), the
queried needle at the swept depth, the three distractors at RULER's random depths.

Score: RULER's ``string_match_all``. Generator and protocol: slimbench/zoo/datasets/long_context.py,
tasks/_long_context.py.
"""

from __future__ import annotations

from slimbench.tasks._long_context import DepthConfig, Spec, make_task, ruler_score

from slimbench.zoo.datasets.long_context import needle_task

SPEC = Spec("niah-multikey", lambda seed, units, depth, length: needle_task(seed, units, depth, keys=4), ruler_score,
            "RULER niah_multikey_1 (essay haystack: Shakespeare test split), queried needle at the swept depth; "
            "string_match_all", depths=True)
TASK = make_task(SPEC, DepthConfig, "ruler-synthetic/1", "needle in a haystack, 4 keys, 1 queried (RULER)")
