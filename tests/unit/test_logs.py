"""The one log channel: `[rayclip] ...` lines on stdout, once per record, and third-party noise dropped by message only."""

from __future__ import annotations

import logging

from orchestrator.logs import drop_records, get_logger, setup_logging, without_printed_lines


def test_records_print_once_as_rayclip_lines_even_when_the_root_logger_prints_too(capsys):
    root_handler = logging.StreamHandler()  # what Ray Train installs on a worker's root logger
    logging.getLogger().addHandler(root_handler)
    rayclip = logging.getLogger("rayclip")
    saved = rayclip.propagate
    try:
        setup_logging()
        setup_logging()  # a second call installs nothing more
        get_logger("train").info("step %d/%d", 1, 600)
    finally:
        logging.getLogger().removeHandler(root_handler)
        rayclip.propagate = saved
    captured = capsys.readouterr()
    assert captured.out == "[rayclip] step 1/600\n"
    assert "step 1/600" not in captured.err


def test_drop_records_silences_only_the_named_messages(caplog):
    noisy = logging.getLogger("some.library.module")
    drop_records("some.library.module", "Token authentication is enabled for this")
    drop_records("some.library.module", "Token authentication is enabled for this")
    with caplog.at_level(logging.INFO, logger="some.library.module"):
        noisy.warning("Token authentication is enabled for this Ray cluster.")
        noisy.warning("Token authentication failed")
    assert [r.getMessage() for r in caplog.records] == ["Token authentication failed"]
    assert len(noisy.filters) == 1


def test_without_printed_lines_keeps_every_other_line(capsys):
    with without_printed_lines("DeepSpeed deepspeed.ops.comm."):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something the user should see")
    assert capsys.readouterr().out == "something the user should see\n"


def test_forwarded_ray_lines_lose_only_the_named_noise(monkeypatch):
    import io

    from ray._private import worker

    from orchestrator.logs import drop_forwarded_lines
    from orchestrator.noise import DRIVER, DropForwarded, rules_for

    RAY_NOISE = tuple(rule.fragment for rule in rules_for(DRIVER) if isinstance(rule, DropForwarded))

    monkeypatch.setattr(worker, "print_worker_logs", worker.print_worker_logs)  # restored after the test
    drop_forwarded_lines(*RAY_NOISE)
    drop_forwarded_lines(*RAY_NOISE)  # a second job in one process wraps nothing twice
    noise = ("core_worker.cc:2465: Actor with class name: 'X' has constructor arguments in the object store and "
             "max_restarts > 0. If the arguments ... are lost, the actor restart will fail.")
    sink = io.StringIO()
    # a worker's output and a raylet warning, through Ray's own printing (as its log thread and error listener call it)
    worker.print_worker_logs({"lines": [noise, "[rayclip] step 1/10 loss 5.0", noise], "pid": 7, "ip": "127.0.0.1",
                              "is_err": False, "task_name": "RayTrainWorker", "actor_name": ""}, sink, False)
    worker.print_worker_logs({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: abc"],
                              "pid": "raylet", "is_err": False}, sink, False)
    printed = sink.getvalue().splitlines()
    assert len(printed) == 1 and printed[0].endswith("[rayclip] step 1/10 loss 5.0"), printed
