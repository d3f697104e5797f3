"""`niah-single`: single needle in a haystack (RULER ``niah_single_2``: essay haystack, word key,
7-digit value), the needle's depth swept over 0-100% of the haystack's sentences.

Haystack: sentences of the Shakespeare test split from a seeded start (RULER: Paul Graham
essays). Score: RULER's ``string_match_all``. Generator and protocol:
slimbench/zoo/datasets/long_context.py, tasks/_long_context.py.
"""

from __future__ import annotations

from slimbench.tasks._long_context import DepthConfig, Spec, make_task, ruler_score

from slimbench.zoo.datasets.long_context import needle_task

SPEC = Spec("niah-single", lambda seed, units, depth, length: needle_task(seed, units, depth), ruler_score,
            "RULER niah_single_2 (essay haystack: Shakespeare test split), needle at the swept depth; "
            "string_match_all", depths=True)
TASK = make_task(SPEC, DepthConfig, "ruler-synthetic/1", "needle in a haystack, one needle at swept depths (RULER)")
