"""`passkey`: passkey retrieval (Mohtashami & Jaggi, 2023, Landmark Attention; LongLoRA's evaluation).

A five-digit-or-shorter key (uniform in 1..50000) hidden at a swept depth of repeated noise
sentences ("The grass is green. ..."), then "What is the pass key? The pass key is". Correct when
the first generated tokens are exactly the tokens of " <key>" (LongLoRA compares the first
``len(answer)`` generated tokens with the answer's). Generator and protocol:
slimbench/zoo/datasets/long_context.py, tasks/_long_context.py.
"""

from __future__ import annotations

from pydantic import Field
from slimbench.tasks._long_context import DepthConfig, Spec, make_task

from slimbench.zoo.datasets.long_context import passkey_task


class PasskeyConfig(DepthConfig):
    max_new_tokens: int = Field(8, ge=1, le=1024, description="greedy tokens generated (the key's tokens are compared)")


def exact_key(prediction: str, generated: list[int], lm, example) -> float:
    want = lm.encode(" " + example.parts.answers[0])
    return 1.0 if generated[: len(want)] == want else 0.0


SPEC = Spec("passkey", lambda seed, units, depth, length: passkey_task(seed, units, depth), exact_key,
            "Landmark Attention's passkey prompt; exact match of the key's tokens (LongLoRA)", depths=True)
TASK = make_task(SPEC, PasskeyConfig, "passkey/1", "passkey retrieval at swept depths; exact key tokens")
