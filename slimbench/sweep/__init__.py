"""The sweep: suite -> validated cells -> executors -> runner -> records in the store.

suite (YAML -> cells, validated before anything runs), runner (one unit of groups: load, compress
once, evaluate; cellrun: one cell's work and record; timed: the timed cells a report compares,
measured interleaved; memory_probe: their peak memory in a fresh process), driver (claims cells,
hands units to an executor, writes every record), executors (this process, worker processes, Ray;
node_lock: the machine lock timed cells hold), store (one JSON record per cell), cell_claims
(which run computes which cell), status (where a sweep stands, the ETA), artifacts (the
compressed-model cache).
"""
