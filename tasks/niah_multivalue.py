"""`niah-multivalue`: one key with four values, each needle at a random depth (RULER
``niah_multivalue``); the answer must hold all four (``string_match_all`` gives partial credit).

Generator and protocol: slimbench/zoo/datasets/long_context.py, tasks/_long_context.py.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.tasks._long_context import LongContextConfig, Spec, make_task, ruler_score

from slimbench.zoo.datasets.long_context import needle_task


class MultiValueConfig(LongContextConfig):
    max_new_tokens: int = Field(48, ge=1, le=1024, description="greedy tokens generated per answer (stops at EOS)")


SPEC = Spec("niah-multivalue", lambda seed, units, depth, length: needle_task(seed, units, 50, values=4), ruler_score,
            "RULER niah_multivalue (essay haystack: Shakespeare test split); string_match_all")
TASK = make_task(SPEC, MultiValueConfig, "ruler-synthetic/1", "needle in a haystack, one key with 4 values (RULER)")
