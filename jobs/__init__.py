"""Thin command-line entry points: parse (``jobs.cli``), build, run, report. Everything testable lives in orchestrator/ and models/."""
