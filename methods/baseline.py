"""`baseline`: the model unchanged, the reference every delta is measured against."""

from slimbench.config import Config
from slimbench.method import Method, MethodReport


class BaselineConfig(Config):
    pass


def apply(lm, cfg: BaselineConfig, ctx) -> MethodReport:
    return MethodReport(execution="native", details={"dtype": str(next(lm.model.parameters()).dtype)})


METHOD = Method(
    name="baseline",
    family="baseline",
    description="the model as loaded, unchanged (the reference for every delta)",
    config=BaselineConfig,
    apply=apply,
)
