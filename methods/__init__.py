"""Compression and acceleration methods: one file each, declaring a module-level ``METHOD``."""
