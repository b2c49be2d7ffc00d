"""Checkpoint tests run offline: transformers must work from local files only."""
import os

# Nothing may be fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
