"""Which failures a restart can heal and which stop a run at once. A leaf: imports nothing of rayclip's.

Ray Train restarts the worker group after any worker error (``checkpoint.max_failures`` times). That is right
for a lost node, a preemption or a storage hiccup, and wrong for an error the restart meets again: bad data
over the error budget, a damaged checkpoint, a full disk, a config a worker rejects, a loss that keeps
diverging, a batch that does not fit the accelerator, an error in the code. Those raise a :class:`CannotHeal` error (or are
recognised by :func:`cannot_heal`); Ray Train's controller then stops the run at once (the callback in
``orchestrator.train.launch``) and the job prints one line with the cause and what to do.
"""

from __future__ import annotations

import errno

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# Errors of the code itself: a restart runs the same code on the same state and meets them again.
_CODE_ERRORS = (NameError, AttributeError, TypeError, ImportError, SyntaxError, NotImplementedError)


class CannotHeal(Exception):
    """An error that a restart from the last checkpoint would meet again; the message says what to do."""


class RunStopped(Exception):
    """A run stopped for an error a restart cannot heal (raised on the driver, from the controller): ``reason`` is
    the line the job prints, ``kind`` the error's class (a search's trial lists name it)."""

    def __init__(self, reason: str, rank: int | None = None, kind: str = ""):
        super().__init__(f"{kind}: {reason}" if kind else reason)
        self.reason, self.rank, self.kind = reason, rank, kind

    def __reduce__(self):
        return RunStopped, (self.reason, self.rank, self.kind)


def cannot_heal(error: BaseException) -> str | None:
    """One line naming the cause when ``error`` (or an error behind it) cannot be healed by a restart; None when
    a restart may help (a lost worker, a preemption, a network error: Ray Train retries those)."""
    for cause in _chain(error):
        if isinstance(cause, CannotHeal):
            return str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            where = f" writing {cause.filename}" if cause.filename else ""
            return f"no space left on the disk{where} ({cause.strerror}): free space or point the run elsewhere"
        if isinstance(cause, _CODE_ERRORS):
            return (f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''} "
                    "(an error in the code: see the worker's traceback above)")
        # torch's accelerator OOM: the same batch will not fit again. Ray's class of the same name (its memory
        # monitor killed workers to save the host's RAM) may come from other processes' load: a restart may help.
        if type(cause).__name__ == "OutOfMemoryError" and type(cause).__module__.startswith("torch"):
            return (f"out of accelerator memory ({str(cause).splitlines()[0][:200]}): lower "
                    "deepspeed.micro_batch_size (python jobs/plan.py shows what fits)")
    return None


def error_kind(error: BaseException) -> str:
    """The class name of a worker's error (under Ray Train's wrapping, its original in ``_base_exc``)."""
    return type(getattr(error, "_base_exc", error)).__name__


def explains_itself(error: BaseException) -> bool:
    """Whether :func:`cannot_heal`'s one line says all there is (a stack trace adds nothing but for code errors)."""
    reason = cannot_heal(error)
    return reason is not None and not any(isinstance(cause, _CODE_ERRORS) for cause in _chain(error))


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        # Ray Train hands the controller a worker's error wrapped, the original in ``_base_exc``
        error = getattr(error, "_base_exc", None) or error.__cause__ or error.__context__
