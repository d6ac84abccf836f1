"""One exception tree: every error a user may see is a HuahuaError with one friendly sentence."""

from __future__ import annotations


class HuahuaError(Exception):
    """Base of every error shown to a user; `str(err)` is one friendly sentence."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidOption(HuahuaError):
    """An /imagine option (or any user input) is malformed or out of range."""

    code = "invalid_option"


class EmptyPrompt(InvalidOption):
    code = "empty_prompt"


class BlockedPrompt(HuahuaError):
    """The text or the Chinese prompt matched the blocklist."""

    code = "blocked"


class QuotaExceeded(HuahuaError):
    code = "quota"


class QueueFull(HuahuaError):
    code = "queue_full"


class TooManyJobs(HuahuaError):
    """The user already has the maximum number of jobs queued or running."""

    code = "too_many_jobs"


class NotFound(HuahuaError):
    code = "not_found"


class NotAllowed(HuahuaError):
    code = "not_allowed"


class EngineUnavailable(HuahuaError):
    """The engine cannot run: weights missing, worker unreachable, device failure."""

    code = "engine_unavailable"


class EngineUnreachable(EngineUnavailable):
    """The remote engine could not be reached or broke off: a passing outage, so the job is retried."""

    code = "engine_unreachable"


class CheckpointError(HuahuaError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""

    code = "checkpoint"


class JobCancelled(HuahuaError):
    code = "cancelled"

    def __init__(self, message: str = "The job was cancelled.") -> None:
        super().__init__(message)


class ServiceUnavailable(HuahuaError):
    """A backing service (Redis, the database) cannot be reached or answered with an error."""

    code = "service_unavailable"


class StorageError(HuahuaError):
    """Stored data is corrupt, from a newer version of Huahua, or cannot be written."""

    code = "storage"
