"""Evaluation tasks: one file each, declaring a module-level ``TASK`` (named and versioned)."""
