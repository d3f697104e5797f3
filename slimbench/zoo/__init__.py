"""The model zoo and its data: registered models, corpora, evaluation datasets, shapes without weights."""
