"""Acceleration: methods that make a model execute faster without (or on top of) compressing it."""
