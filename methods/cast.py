"""`cast`: convert every floating-point weight to bf16 or fp16.

Native execution: the model really holds half the bytes and runs the dtype's own kernels,
which is also why it can be slower. On the project's CPU (AVX-512 BF16, no FP16 arithmetic)
bf16 matrix products are ~2.4x faster than fp32 while fp16 ones are ~4x slower, so an fp16
prefill is slower than fp32, while fp16 single-token decode (bound by reading the weights) is
faster. The efficiency task measures each as it is; the README has the figures.
"""

from typing import Literal

from pydantic import Field

from slimbench.config import Config
from slimbench.method import Method, MethodReport
from slimbench.specs import DTYPES


class CastConfig(Config):
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="target dtype")


def apply(lm, cfg: CastConfig, ctx) -> MethodReport:
    lm.model.to(DTYPES[cfg.dtype])
    bits = 16
    return MethodReport(execution="native", details={"dtype": cfg.dtype, "bits": bits, "effective_bits": bits})


METHOD = Method(
    name="cast",
    family="precision",
    description="cast all weights to bfloat16 or float16 (native; fp16 matmuls are slow on CPUs without fp16 math)",
    config=CastConfig,
    apply=apply,
)
