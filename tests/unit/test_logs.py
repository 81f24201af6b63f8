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
