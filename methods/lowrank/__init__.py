"""Low-rank factorization methods (svd, asvd, svd-llm) and the helpers they share."""
