"""Errors the boss raises; each message is meant for the user.

    EcloudError (protocol.errors)
    └── BossError
        ├── UserError            bad input; the CLI exits 2
        │   ├── PushError        a push file is wrong (every problem listed)
        │   ├── NotFound         no such task / worker
        │   └── InvalidState     the transition is not allowed from this state
        ├── DatabaseError        the database cannot be reached or migrated
        └── NotInitialised       `boss init` has not been run
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.errors import EcloudError


class BossError(EcloudError):
    """Base of the boss's errors."""


class UserError(BossError):
    """The user asked for something wrong; nothing was changed."""


class PushError(UserError):
    """A push was refused; ``problems`` lists every reason, one line each."""

    def __init__(self, source: str, problems: Sequence[str], total: int | None = None) -> None:
        self.source = source
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        more = self.total - len(self.problems)
        lines = [f"{source}: {p}" for p in self.problems]
        if more > 0:
            lines.append(f"{source}: ... and {more} more problems")
        lines.append(f"{source}: nothing was pushed")
        super().__init__("\n".join(lines))


class NotFound(UserError):
    """No such task or worker."""


class InvalidState(UserError):
    """The task is not in a state that allows this."""


class DatabaseError(BossError):
    """The database failed; the message says which and why."""


class NotInitialised(BossError):
    """The database has no tables yet."""
