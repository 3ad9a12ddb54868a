"""The service's exceptions and their one mapping to the OpenAI error envelope.

Code anywhere in ``serve`` raises these; only the HTTP edge turns them into responses, with
:func:`error_response`, for JSON and streaming requests alike. Any other exception becomes a 500 whose
message hides internals.

    >>> status, body, headers = error_response(InvalidRequest("bad top_p", param="top_p"))
    >>> status, body["error"]["type"], body["error"]["param"]
    (400, 'invalid_request_error', 'top_p')
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def __reduce__(self) -> tuple[Any, ...]:
        """Keep ``param``, ``code`` and the rest when the error crosses a process boundary (Ray pickles it)."""
        return (_rebuild, (type(self), self.message, self.__dict__))


class InvalidRequest(ServiceError):
    """The request is malformed or asks for something the service cannot do (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt with the tokens asked for, does not fit in a sequence (400, as OpenAI answers)."""

    default_code = "context_length_exceeded"


class InvalidImage(InvalidRequest):
    """The image cannot be read, or breaks the configured limits (400)."""

    default_code = "invalid_image"


class Unauthorized(ServiceError):
    """Missing or wrong API key (401)."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(ServiceError):
    """Unknown model or route (404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLarge(ServiceError):
    """The request body or the image is over the configured size (413)."""

    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class Unavailable(ServiceError):
    """The service is at capacity, not ready, or lost a replica it needed; retry after ``retry_after`` (503)."""

    status = 503
    type = "service_unavailable"
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Timeout(ServiceError):
    """The request took longer than the configured limit (504)."""

    status = 504
    type = "timeout"
    default_code = "timeout"


def _rebuild(cls: type[ServiceError], message: str, state: dict[str, Any]) -> ServiceError:
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI envelope and headers for an exception (a generic 500 for unexpected ones)."""
    if not isinstance(exc, ServiceError):
        exc = ServiceError("internal error while serving the request; it has been logged", code="internal_error")
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return exc.status, body, headers
