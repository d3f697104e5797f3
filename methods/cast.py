"""`cast`: convert every floating-point weight to bf16 or fp16.

Native execution: the model really holds half the bytes and runs the dtype's own kernels.
That is also why it can be slower: this CPU has fast bf16 matmuls (AVX-512 BF16) but no fast
fp16 kernel, so an fp16 model runs orders of magnitude slower than fp32 here. The efficiency
task measures that as it is.
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
    description="cast all weights to bfloat16 or float16 (native; fp16 is very slow on CPUs without fp16 kernels)",
    config=CastConfig,
    apply=apply,
)
