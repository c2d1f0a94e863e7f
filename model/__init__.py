"""CFN-ESA for streaming dialogue emotion recognition.

Pure model code: torch math, its configuration, state and checkpoints. Nothing
here talks to Kafka, Redis or WebSockets (see tests/test_boundaries.py).
"""
