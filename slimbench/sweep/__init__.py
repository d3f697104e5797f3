"""The sweep: suite -> validated cells -> executors -> runner -> records in the store.

suite (YAML -> cells, validated before anything runs), runner (one group of cells: load, compress
once, evaluate), driver (claims cells, hands groups to an executor, writes every record),
executors (this process, worker processes, Ray), store (one JSON record per cell), cell_claims
(which run computes which cell), status (where a sweep stands, ETA), artifacts (the
compressed-model cache).
"""
