"""Exceptions, grouped by what the caller should do (after singer_sdk.exceptions)."""

from __future__ import annotations

from singer_sdk.exceptions import FatalAPIError


class OrbFatalError(FatalAPIError):
    """Stop the run now: configuration or authorization is wrong; retrying cannot help."""


class OrbRetryExhaustedError(FatalAPIError):
    """A request kept failing with retryable errors for the whole `max_retry_seconds` budget."""


class OrbInvalidEventError(FatalAPIError):
    """A record could not be delivered and `invalid_event_policy` is `fail`."""


class StateWriteError(FatalAPIError):
    """STATE could not be written to stdout (the orchestrator stopped reading, a full pipe)."""


class PipelineClosedError(RuntimeError):
    """Work was handed to the delivery pipeline after it was closed (a target-orb bug)."""


class DeliveryAbortedError(Exception):
    """Delivery stopped because the run is shutting down (a signal or another failure)."""


class TerminatedError(BaseException):
    """The process received SIGTERM/SIGINT; derived from BaseException so nothing swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum
