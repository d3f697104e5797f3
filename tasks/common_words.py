"""`common-words`: RULER's aggregation task (``cwe``): a numbered list of words where ten appear 30
times and the rest 3 (6 and 1 below 4,096 tokens), after one demonstration; the answer must name
the ten (``string_match_all``). Words: the Shakespeare test split's vocabulary (RULER: wonderwords).

Generator and protocol: slimbench/zoo/datasets/long_context.py, tasks/_long_context.py.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.tasks._long_context import LongContextConfig, Spec, make_task, ruler_score

from slimbench.zoo.datasets.long_context import common_words_task


class CommonWordsConfig(LongContextConfig):
    max_new_tokens: int = Field(64, ge=1, le=1024, description="greedy tokens generated per answer (RULER: 120)")


SPEC = Spec("common-words", lambda seed, units, depth, length: common_words_task(seed, units, length=length),
            ruler_score, "RULER cwe (freq 30/3 from 4k tokens, 6/1 below; one demonstration); string_match_all")
TASK = make_task(SPEC, CommonWordsConfig, "ruler-synthetic/1", "common-word extraction from a long list (RULER)")
