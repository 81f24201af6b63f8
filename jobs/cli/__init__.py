"""The one command-line layer: argv -> typed values for the library, and the one-line refusal (exit code 2).

``arguments`` holds what every job shares (the parser, argparse types, ``--set``, :func:`fail`); ``flags``
holds each job's flags. Library code (``orchestrator/``, ``models/``) never parses a command line.
"""

from jobs.cli.arguments import add_overrides, config_file_argument, count_argument, endpoint_url_argument, fail, job_parser
from jobs.cli.flags import (
    parse_demo_args,
    parse_evaluate_args,
    parse_no_args,
    parse_plan_args,
    parse_prepare_args,
    parse_pretrain_args,
    parse_tune_args,
)

__all__ = [
    "add_overrides",
    "config_file_argument",
    "count_argument",
    "endpoint_url_argument",
    "fail",
    "job_parser",
    "parse_demo_args",
    "parse_evaluate_args",
    "parse_no_args",
    "parse_plan_args",
    "parse_prepare_args",
    "parse_pretrain_args",
    "parse_tune_args",
]
