"""Compress once, evaluate many: the compressed-model cache (cache, identity) and the stored form (serialize)."""
