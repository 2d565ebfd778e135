"""Errors of the web layer, in the same tree as the core's (under PiggybackError):

PiggybackError
└── ServerError
    ├── NotReadyError               the backbone is still loading or warming up   -> 503
    │   └── DrainingError           the server is shutting down (SIGTERM)         -> 503 + Retry-After
    ├── QueueFullError              the request queue is at its bound             -> 503 + Retry-After
    ├── BodyBudgetError             request bodies in flight at their byte budget -> 503 + Retry-After, closed
    ├── DeviceMemoryError           a batch ran out of device memory twice        -> 503 + Retry-After
    ├── DeadlineExceededError       the request waited past its deadline          -> 504
    ├── PayloadTooLargeError        a body over the upload limit                  -> 413
    ├── UnsupportedMediaTypeError   not an image/* body nor multipart with 'image' -> 415
    ├── BadRequestError             a malformed request (e.g. broken multipart)   -> 422
    ├── VersionNotFoundError        a v2 model version that is not the one served -> 404
    ├── TaskNotLoadedError          model_control=explicit: a stored task not loaded -> 404
    ├── AuthenticationError         no or wrong bearer token                      -> 401
    ├── ManagementDisabledError     no token configured, management refused       -> 403
    ├── RequestTimeoutError         the body did not arrive within body_timeout_s -> 408, connection closed
    └── ClientDisconnectedError     the client hung up before its request was read -> 499 (nginx's code)
"""

from __future__ import annotations

from piggyback_core import PiggybackError

__all__ = [
    "AuthenticationError",
    "BodyBudgetError",
    "BadRequestError",
    "ClientDisconnectedError",
    "DeadlineExceededError",
    "DeviceMemoryError",
    "DrainingError",
    "ManagementDisabledError",
    "NotReadyError",
    "PayloadTooLargeError",
    "VersionNotFoundError",
    "QueueFullError",
    "TaskNotLoadedError",
    "RequestTimeoutError",
    "ServerError",
    "UnsupportedMediaTypeError",
]


class ServerError(PiggybackError):
    pass


class NotReadyError(ServerError):
    def __init__(self, message: str = "the server is starting: backbone not loaded and warmed up yet") -> None:
        super().__init__(message)


class QueueFullError(ServerError):
    def __init__(self, *, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"the server is at capacity ({limit} requests queued); retry shortly")


class BodyBudgetError(ServerError):
    def __init__(self, *, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"the server holds {limit} bytes of request bodies already; retry shortly")


class DeviceMemoryError(ServerError):
    def __init__(self, *, images: int, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"the device ran out of memory for a batch of {images} image(s), even split; retry shortly")


class DeadlineExceededError(ServerError):
    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"the request was not served within its deadline of {timeout_s:g} s")


class PayloadTooLargeError(ServerError):
    def __init__(self, *, limit: int, what: str = "body") -> None:
        self.limit = limit
        super().__init__(f"{what} is larger than the limit of {limit:,} bytes")


class UnsupportedMediaTypeError(ServerError):
    pass


class BadRequestError(ServerError):
    pass


class AuthenticationError(ServerError):
    pass


class ManagementDisabledError(ServerError):
    def __init__(self) -> None:
        super().__init__(
            "task management is disabled: no token is configured (set PIGGYBACK_TOKEN, or "
            "PIGGYBACK_ALLOW_UNAUTHENTICATED=true for local development only)"
        )


class DrainingError(NotReadyError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica")


class RequestTimeoutError(ServerError):
    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"the request body did not arrive within {timeout_s:g} s")


class ClientDisconnectedError(ServerError):
    """Not a server fault: the client closed the connection before its request was read."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before sending the whole request")


class VersionNotFoundError(ServerError):
    def __init__(self, *, task: str, version: str, served: str) -> None:
        self.task, self.version, self.served = task, version, served
        super().__init__(f"task {task!r} has no version {version!r}; it serves version {served!r}")


class TaskNotLoadedError(ServerError):
    """With ``model_control=explicit``: ``task`` is in the store but was not loaded."""

    def __init__(self, *, task: str) -> None:
        self.task = task
        super().__init__(
            f"task {task!r} is not loaded (model_control=explicit): load it with POST /v2/repository/models/{task}/load"
        )
