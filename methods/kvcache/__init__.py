"""KV-cache eviction policies (H2O, SnapKV, PyramidKV, TOVA, StreamingLLM, key norm), one file each.

The shared machinery lives in ``hook.py`` (the attention wrapper that hands each layer the
queries it attended with), ``layer.py`` (the cache layer that evicts, optionally holding int8/int4
codes) and ``policy.py`` (configs, the cache factory, recorded prefills); docs/long-context.md
explains the design and the measurements.
"""
