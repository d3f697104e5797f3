"""Serving under load: an OpenAI-compatible server for the cell's model, driven by GuideLLM.

- ``servers``: which server serves a cell (transformers in process, llama.cpp, vLLM) and building it.
- ``hosted``: `transformers serve` hosting the cell's in-memory compressed model.
- ``process``: server processes on loopback: free port, readiness, stop whatever happens, logs.
- ``loadgen``: GuideLLM in its own environment; one bounded run of it.
- ``workload``: requests cut from real corpus text (prompt and output length distributions).
- ``session``: one measurement (server up, warm, load, CPU sampled per side, server down).
- ``analysis``: load points from GuideLLM's report; SLO, goodput, the highest rate meeting it.

The ``serving`` task (tasks/serving.py) is the protocol; docs/serving.md the user's guide.
"""
