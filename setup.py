"""Packaging: the repository's `methods/`, `tasks/` and `configs/` folders become
`slimbench.methods`, `slimbench.tasks` and `slimbench.configs` in an installed distribution.

Metadata lives in pyproject.toml; only the package list is computed here, because it maps
folders that sit beside `slimbench/` into it (pyproject's static `packages.find` cannot).
"""

from setuptools import find_packages, setup

MAPPED = {"methods": "slimbench.methods", "tasks": "slimbench.tasks"}

packages = find_packages(include=["slimbench", "slimbench.*"])
packages.append("slimbench.configs")  # suites as package data (no __init__.py)
for folder, name in MAPPED.items():
    packages += [name] + [f"{name}.{p}" for p in find_packages(where=folder)]

setup(
    packages=packages,
    package_dir={"slimbench": "slimbench", **{name: folder for folder, name in MAPPED.items()},
                 "slimbench.configs": "configs"},
)
