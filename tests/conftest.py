"""Shared test settings.

Timeouts in tests scale with CFNESA_TEST_TIMEOUT_FACTOR (slow CI machines).
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings

# real embedded Kafka (Tansu) and redis-server fixtures: tests/fixtures_services.py;
# their TLS / SASL versions for the secure-connection tests: tests/fixtures_tls.py
pytest_plugins = ["fixtures_services", "fixtures_tls"]

# Two cores: keep torch from oversubscribing them when pytest runs alongside.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")

TIMEOUT_FACTOR = float(os.environ.get("CFNESA_TEST_TIMEOUT_FACTOR", "1"))
