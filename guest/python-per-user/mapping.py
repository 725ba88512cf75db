"""Ids and the per-user mapping: which backend serves a thread.

Every thread ``{user}-{rest}`` of a user maps to one backend whose id is the
user id, so all of a user's threads share one container and the workspace
``{workspace-root}/{user}``.

The host checks every id on every call (wit/sandbox.wit, "Ids"); the policy
checks them again because it is the policy's answer the host routes on, and
an id the policy cannot vouch for must never reach a container call. The
rules are the host's, character for character.
"""

import re

from componentize_py_types import Err
from wit_world.imports.types import Error_InvalidId

# Stamped on the containers this policy creates (the `sandbox.policy` label)
# and used as the `context` of its log lines.
NAME = "python-per-user"

# fullmatch only: `re.match` with `$` would accept a trailing newline.
_USER = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
_THREAD_REST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_BACKEND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")


def shown(text: str) -> str:
    """Untrusted input quoted for an error message: at most 48 characters,
    control characters escaped, so an id can neither flood nor forge a log
    line (the host's `sandbox_contract::shown`)."""
    if len(text) > 48:
        return repr(text[:48]) + "..."
    return repr(text)


def invalid(message: str) -> Err:
    """The typed `invalid-id` error, raised as componentize-py's `Err` so it
    becomes the export's `result` error."""
    return Err(Error_InvalidId(message))


def check_user(user_id: str) -> str:
    """The user id, or `invalid-id`: it becomes a directory name on the host,
    hence lowercase only and no `.`."""
    if not _USER.fullmatch(user_id):
        raise invalid(
            f"user id {shown(user_id)}: 1 to 64 of [a-z0-9_], "
            "starting with a letter or a digit"
        )
    return user_id


def user_of_thread(thread_id: str) -> str:
    """The user of a thread: the part before the first ``-``."""
    user, dash, rest = thread_id.partition("-")
    if not _USER.fullmatch(user) or (dash and not _THREAD_REST.fullmatch(rest)):
        raise invalid(
            f"thread id {shown(thread_id)}: expected {{user}} or {{user}}-{{rest}}"
        )
    return user


def backend_id(thread_id: str) -> str:
    """WIT `backend-id`: the user id. Pure (the host routes every call on it
    and may call it at any time) and the identity on its own outputs, since
    a user id read as a thread id is its own user."""
    return user_of_thread(thread_id)


def check_own_backend(backend: str) -> str:
    """The backend id, when it is one this mapping answers (a user id);
    otherwise `invalid-id`, before any host call. A per-thread backend
    `alice-1` is a valid backend id, but not ours."""
    if not _BACKEND.fullmatch(backend):
        raise invalid(f"backend id {shown(backend)}: not a valid backend id")
    if not _USER.fullmatch(backend):
        raise invalid(
            f"backend id {shown(backend)} is not one the {NAME} policy answers"
        )
    return backend


def describe(backend: str) -> str:
    """How log lines name the backend: "user alice"."""
    return f"user {backend}"
