"""The Service's one exception hierarchy: every refusal a request can meet, with its HTTP status.

Each protocol skin maps ``ServiceError`` to its own error body in one place (the JSON routes in
app/api/errors.py, the Open Inference Protocol in app/api/oip/core.py, gRPC to its status
codes). The statuses are HTTP's because HTTP is what most skins speak; gRPC and OIP translate
them. A new refusal is a new subclass here, and every skin answers it at once.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal: ``status`` (HTTP), ``code`` (machine-readable), ``message`` (for people),
    ``retry_after`` (seconds, for 503s)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    """The request itself is malformed (400)."""

    status, code = 400, "bad_request"


class InvalidParameter(ServiceError):
    """A parameter is outside its bounds (422)."""

    status, code = 422, "invalid_parameters"


class TooLarge(ServiceError):
    """Too many images, too many bytes or too many pixels (413)."""

    status, code = 413, "too_large"


class UnsupportedImage(ServiceError):
    """Not an image in an accepted format, or undecodable (415)."""

    status, code = 415, "unsupported_image"


class UnknownId(ServiceError):
    """No vector stored under an id, for this caller (404)."""

    status, code = 404, "unknown_id"


class Unavailable(ServiceError):
    """Try again later (503 + Retry-After): not ready, overloaded, draining, store down."""

    status, code = 503, "unavailable"


class SearchNotSupported(ServiceError):
    """The configured store cannot search (501)."""

    status, code = 501, "search_unavailable"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images reached the network (504)."""

    status, code = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    """The forward pass failed: this request fails, the service goes on (500)."""

    status, code = 500, "inference_failed"
