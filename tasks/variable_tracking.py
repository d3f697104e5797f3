"""`variable-tracking`: RULER's multi-hop tracing (``vt``): one chain ``VAR A = 12345``, ``VAR B = VAR A``,
... (four hops, five-letter names) spread through noise lines, after one demonstration; the answer
must name all five variables (``string_match_all``).

Generator and protocol: slimbench/zoo/datasets/long_context.py, tasks/_long_context.py.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.tasks._long_context import LongContextConfig, Spec, make_task, ruler_score

from slimbench.zoo.datasets.long_context import variable_tracking_task


class VariableTrackingConfig(LongContextConfig):
    max_new_tokens: int = Field(30, ge=1, le=1024, description="greedy tokens generated per answer (RULER: 30)")


SPEC = Spec("variable-tracking", lambda seed, units, depth, length: variable_tracking_task(seed, units), ruler_score,
            "RULER vt (1 chain, 4 hops, noise haystack, one demonstration); string_match_all")
TASK = make_task(SPEC, VariableTrackingConfig, "ruler-synthetic/1", "variable tracking through assignments (RULER)")
