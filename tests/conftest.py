"""Test-session set-up shared by every test directory."""

from orchestrator import noise


def pytest_configure(config):
    # Third-party warnings are filtered by rayclip's one noise policy (orchestrator/noise.py), not here.
    for line in noise.pytest_filters():
        config.addinivalue_line("filterwarnings", line)
