"""Errors a request can get, each with its HTTP status and gRPC code: the frontends map them, the scheduler
and the request decoder raise them. Messages name the field (input, datatype, shape) and what was expected."""
from __future__ import annotations

import grpc


class RequestError(Exception):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(RequestError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class QueueFull(RequestError):
    """The bounded queue is full: the query was not queued (retry later, elsewhere)."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(RequestError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RequestError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServingFailed(RequestError):
    """The model raised on a valid request (a tier down below every fallback, ...)."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
