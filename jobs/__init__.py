"""Thin command-line entry points: parse, build, run, report. Everything testable lives in orchestrator/ and models/."""
