"""Models on disk: discovery, config.yaml, loading main.py, revisions, reload.

Workers import the loader and config reader: this ``__init__`` imports nothing."""
