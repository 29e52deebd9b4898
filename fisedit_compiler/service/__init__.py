"""The session service both front ends use (the web app and the HTTP server): create, generate, upload, edit, undo,
download, reopen, evict, with one memory budget for every session (`service.sessions`)."""

from .compute import ComputeThread
from .sessions import ServiceError, SessionService

__all__ = ["ComputeThread", "SessionService", "ServiceError"]
