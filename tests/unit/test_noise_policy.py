"""rayclip's one noise policy (orchestrator/noise.py): its single home, and every rule still alive."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator import noise

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [path for folder in ("orchestrator", "jobs") for path in sorted((ROOT / folder).rglob("*.py"))
           if path != ROOT / "orchestrator" / "noise.py"]
# Environment variables of third-party libraries that change behaviour, not output: allowed outside the table.
SETTINGS = {
    "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_GCS_SERVER_PORT", "TUNE_DISABLE_STRICT_METRIC_CHECKING",
    "TUNE_FORCE_TRIAL_CLEANUP_S", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
}
THIRD_PARTY_ENV = ("RAY_", "TUNE_", "MLFLOW_", "DS_", "TORCH_", "PYTHONWARNINGS")


def _silencing_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("filterwarnings", "simplefilter", "drop_records", "drop_forwarded_lines",
                              "without_printed_lines")):
                found.append(name)
            elif name.endswith("setLevel") and "getLogger" in name and "get_logger" not in name:
                found.append(ast.unparse(node))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(THIRD_PARTY_ENV) \
                and node.value.isupper() and node.value not in SETTINGS:
            found.append(node.value)
    return found


def test_noise_rules_have_one_home():
    offenders = {str(path.relative_to(ROOT)): calls for path in SCANNED
                 if (calls := _silencing_calls(ast.parse(path.read_text(), str(path))))}
    assert offenders == {}, "silence third-party output through orchestrator/noise.py's table only"


@pytest.mark.parametrize("rule", noise.RULES, ids=lambda rule: f"{rule.kinds[0]}-{rule.source}")
def test_every_rule_still_matches_what_the_pinned_library_emits(rule):
    text = noise.source_text(rule.source)
    missing = [evidence for evidence in rule.evidence if evidence.encode() not in text]
    assert not missing, f"{rule.library}: {rule.source} no longer contains {missing}: remove or update the rule"
    assert rule.why and rule.library.split()[-1][0].isdigit()
    assert set(rule.kinds) <= set(noise.KINDS)


def test_prefixes_still_match_the_evidence():
    for rule in noise.RULES:
        if isinstance(rule, noise.DropRecords) and not rule.text:
            assert rule.evidence == rule.prefixes


def test_env_for_comes_from_the_table():
    assert noise.env_for(noise.RAY_PROCESS) == {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    assert noise.env_for(noise.TRAIN_WORKER) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    with pytest.raises(ValueError, match="unknown process kind"):
        noise.rules_for("trial")


def test_install_drops_only_the_named_records():
    import logging

    noise.install(noise.TUNE_DRIVER)
    noise.install(noise.TUNE_DRIVER)  # idempotent: one filter per rule
    logger = logging.getLogger("ray.tune.tune")
    assert len(logger.filters) == 1

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)

    assert not logger.filter(record("Trials did not complete: [a, b]"))
    assert logger.filter(record("something a user should see"))


def test_a_joined_cluster_gets_the_policy_and_its_address_without_overriding_the_submitter():
    import json

    from orchestrator.ray_start import joined_runtime_env

    plain = joined_runtime_env({"RAY_ADDRESS": "10.0.0.5:6379"})
    assert plain == {"worker_process_setup_hook": "orchestrator.noise.install_ray_process",
                     "env_vars": {**noise.env_for(noise.RAY_PROCESS), "RAY_ADDRESS": "10.0.0.5:6379"}}
    submitted = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "worker_process_setup_hook": "mine.hook",
                                 "env_vars": {"RAY_DATA_LOG_LEVEL": "INFO"}}}
    merged = joined_runtime_env({"RAY_ADDRESS": "10.0.0.5:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(submitted)})
    assert "worker_process_setup_hook" not in merged and "working_dir" not in merged  # Ray refuses a key set twice
    assert "RAY_DATA_LOG_LEVEL" not in merged["env_vars"] and merged["env_vars"]["RAY_ADDRESS"] == "10.0.0.5:6379"
    for client in ("ray://head:10001", "auto"):  # not a GCS address a worker could use
        assert "RAY_ADDRESS" not in joined_runtime_env({"RAY_ADDRESS": client})["env_vars"]
