"""Measurement: clocks and peak memory, the machine's own limits, roofline arithmetic, statistics."""
