"""SlimBench core: registry, typed specs, runner, measurement, results store and reports."""

__version__ = "0.1.0"
