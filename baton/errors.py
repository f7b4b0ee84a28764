"""One error taxonomy for every service, mapped to gRPC and HTTP in one place.

- ``ClientError``: the request is wrong; retrying it unchanged fails again.
- ``RetryableError``: a dependency is down or busy; retrying may succeed.
- anything else is internal.
"""

from __future__ import annotations

import grpc


class BatonError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ClientError(BatonError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFoundError(ClientError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class RetryableError(BatonError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class NoCapacityError(RetryableError):
    """No live worker can take the request."""


class DeadlineExceededError(BatonError):
    """The request's deadline passed: not retried or moved (no time is left
    for that), and the work downstream is cancelled with it."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: ClientError,
    grpc.StatusCode.OUT_OF_RANGE: ClientError,
    grpc.StatusCode.FAILED_PRECONDITION: ClientError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: RetryableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RetryableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError, what: str) -> BatonError:
    """Turn a failed downstream call into our taxonomy, naming the hop."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _FROM_GRPC.get(code, BatonError)
    return cls(f"{what}: {details or code.name}")
