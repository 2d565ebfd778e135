"""Task names: ``^[a-z0-9][a-z0-9_-]{0,63}$``, checked before a name touches a path or a file."""

from __future__ import annotations

import re

from .errors import InvalidTaskNameError

__all__ = ["TASK_NAME_PATTERN", "validate_task_name"]

TASK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def validate_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise InvalidTaskNameError."""
    if not isinstance(name, str) or TASK_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidTaskNameError(name=name)
    return name
