"""Evaluation data: example builders for the Shakespeare tasks and readers for standard benchmarks.

Every reader takes either a local file (``path``; offline) or a hub dataset at a pinned
revision (online), checks every row it reads, and fails with a message naming the file, the
row and the field when a row does not have the expected shape.
"""
