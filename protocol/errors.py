"""Errors shared by boss and worker, and the wire error codes.

    EcloudError                 base of every ecloud error
    ├── SettingsError           a settings file or variable is wrong
    └── ProtocolError           a message on the wire is malformed or refused
"""

from __future__ import annotations

from enum import StrEnum


class EcloudError(Exception):
    """Base of every ecloud error; its message is meant for the user."""


class SettingsError(EcloudError):
    """A settings file or ECLOUD_ variable is wrong."""


class ProtocolError(EcloudError):
    """A message is malformed, or the peer answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Code(StrEnum):
    """Error codes carried in error replies."""

    MALFORMED = "malformed"          # not JSON / not an object / missing fields
    UNKNOWN_CALL = "unknown_call"
    VERSION = "version"              # protocol version not supported
    UNAUTHORIZED = "unauthorized"    # no or wrong token
    NOT_CURRENT = "not_current"      # attempt is no longer current (fencing)
    INTERNAL = "internal"            # the boss failed; retry later
    UNAVAILABLE = "unavailable"      # the boss's database is down or locked; retry later
