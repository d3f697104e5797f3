"""Search methods: choose per-layer settings of other methods under a budget."""
