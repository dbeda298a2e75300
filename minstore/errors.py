"""
The errors a node answers with.  Each carries its HTTP status and the
machine code of the JSON error body (DESIGN section 3).
"""


from typing import Dict, Optional


class MinstoreError(Exception):
    code = 500
    error = "internal_error"
    #: Headers the answer carries beside its JSON body (Allow, Retry-After).
    headers: Dict[str, str] = {}

    def __init__(
        self, error: Optional[str] = None, message: str = "", headers: Optional[Dict[str, str]] = None
    ) -> None:
        Exception.__init__(self, message)
        if error is not None:
            self.error = error
        self.message = message
        if headers:
            self.headers = headers

    def to_json(self) -> Dict[str, str]:
        return {"error": self.error, "message": self.message}


class BadRequest(MinstoreError):
    code = 400
    error = "bad_request"


class RecordExists(MinstoreError):
    code = 400
    error = "record_exists"


class NotFound(MinstoreError):
    code = 404
    error = "not_found"


class MethodNotAllowed(MinstoreError):
    code = 405
    error = "method_not_allowed"


class PreconditionFailed(MinstoreError):
    code = 412
    error = "precondition_failed"


class NoDependants(BadRequest):
    """cache=1 on a node whose servers.list lists no dependant: the client's call."""

    error = "no_dependants"


class PayloadTooLarge(MinstoreError):
    code = 413
    error = "payload_too_large"


class UnsupportedMediaType(MinstoreError):
    code = 415
    error = "unsupported_media_type"


class Rejected(BadRequest):
    """A process refused the record; the message gives its reason."""

    error = "rejected"


class BadGateway(MinstoreError):
    code = 502
    error = "bad_gateway"


class ServiceUnavailable(MinstoreError):
    code = 503
    error = "unavailable"


def error_answer(failure):
    """
    ``(status, headers, body)`` of the JSON answer to a request that failed
    with ``failure``: the one mapping every route shares.  None for an
    error that is a bug (the caller logs it and answers 500).
    """
    import errno

    if failure.check(MinstoreError):
        e = failure.value
        return e.code, e.headers, e.to_json()
    if failure.check(OSError) and failure.value.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, {}, {"error": "insufficient_storage", "message": "the node's disk is full"}
    return None


class IndexBuilding(ServiceUnavailable):
    """A filter on an index whose build has not finished: retry after ``retry_after`` seconds."""

    error = "index_building"

    def __init__(self, message, retry_after=1):
        ServiceUnavailable.__init__(self, message=message)
        #: Headers the answer carries.
        self.headers = {b"retry-after": b"%d" % retry_after}


def error_from_peer(code, body):
    """A peer's JSON error, to answer with as it is (a 400 or 412 passes through)."""
    import json

    try:
        document = json.loads(body)
        error, message = document["error"], document.get("message", "")
    except (ValueError, KeyError, TypeError):
        error, message = "peer_error", body[:200].decode("utf-8", "replace")
    e = MinstoreError(error, message)
    e.code = code
    return e


class InsufficientStorage(MinstoreError):
    """A write failed in storage (a full disk, an I/O error): nothing of it is kept."""

    code = 507
    error = "insufficient_storage"


class StorageFailed(Exception):
    """
    Raised by a storage engine: a write that could not be made durable (the
    node answers 507), or damage found at open that the engine cannot
    recover past (the node refuses to start, saying this one line).
    """
