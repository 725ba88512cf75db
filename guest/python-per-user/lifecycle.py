"""The cache and the container lifecycle: the Python twin of
guest/policy-core/src/policy.rs, for the per-user mapping.

The cache is an optimisation only; Docker (through the host's labels) is the
source of truth. The host may hand any call to a fresh instance (after a
trap, after a restart), so on a cache miss the policy adopts the container
the host labelled for the backend (`containers.find`) before it creates one:
a restart or a policy swap creates no duplicate and leaves no orphan.

Host errors are componentize-py `Err` exceptions carrying the WIT `error`
variant; they are let through unchanged so the caller sees the host's typed
error (`docker-unavailable`, `refused`, ...). Only a `refused` removal during
housekeeping is handled here (work started on the container since we looked).
"""

import math
import time
from dataclasses import dataclass, field

from componentize_py_types import Err
from wit_world.imports import containers, store
from wit_world.imports import logging as wasi_logging
from wit_world.imports.types import (
    Container,
    ContainerStatus,
    Error_NotFound,
    Error_Refused,
    Removal,
)

import mapping

Level = wasi_logging.Level


def log(level: Level, message: str) -> None:
    # The host bounds and escapes the line; the context names the policy.
    wasi_logging.log(level, mapping.NAME, message)


def now_ms() -> int:
    # WASI's wall clock: the clock of `container.last-used-ms`.
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Settings:
    """The deployment's settings (`[policy_config]`, via `wasi:config/store`),
    read the way policy-core's `Lifecycle::from_config` reads them."""

    # Remove a container unused for longer than this.
    idle_ttl_ms: int | None = None
    # At most this many containers; the least recently used idle ones go.
    max_containers: int | None = None
    # "backend": release-thread removes the user's container (the default);
    # "release": only once no thread is left on it.
    thread_destroy: str = "backend"
    # The operator's profile of each listed user (`profile.NAME = "alice,
    # carol"`), and of everyone else (`profile`); the host's `default`
    # without either. The host checks every name it is given.
    profile_by_user: dict[str, str] = field(default_factory=dict)
    profile_fallback: str | None = None
    # Users listed under two profiles get neither: their calls fail.
    profile_conflicts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def profile_of(self, user: str) -> str:
        if user in self.profile_conflicts:
            a, b = self.profile_conflicts[user]
            raise Err(
                Error_Refused(
                    f"user {user} is listed in profile.{mapping.shown(a)} and "
                    f"profile.{mapping.shown(b)} of the policy config"
                )
            )
        return self.profile_by_user.get(user) or self.profile_fallback or "default"

    @classmethod
    def from_config(cls, pairs: list[tuple[str, str]]) -> "Settings":
        """Unknown keys are ignored; unusable values are logged and ignored,
        so a typo degrades to the default instead of breaking the policy."""
        idle_ttl_ms, max_containers, thread_destroy = None, None, "backend"
        profile_by_user: dict[str, str] = {}
        profile_conflicts: dict[str, tuple[str, str]] = {}
        profile_fallback = None
        for key, value in pairs:
            if key == "profile":
                profile_fallback = value.strip()
                continue
            if key.startswith("profile."):
                name = key.removeprefix("profile.")
                for user in (u.strip() for u in value.split(",")):
                    if not user:
                        continue
                    other = profile_by_user.get(user)
                    if other is not None:
                        log(
                            Level.ERROR,
                            f"user {mapping.shown(user)} is listed in profile.{mapping.shown(other)} "
                            f"and profile.{mapping.shown(name)}: their calls fail until one goes",
                        )
                        profile_conflicts[user] = (other, name)
                    profile_by_user[user] = name
                continue
            match key:
                case "idle_ttl_secs":
                    secs = _parse_float(value)
                    if secs is not None and secs > 0 and math.isfinite(secs):
                        idle_ttl_ms = int(secs * 1000)
                        continue
                case "max_containers":
                    count = _parse_count(value)
                    if count is not None and count > 0:
                        max_containers = count
                        continue
                case "thread_destroy":
                    if value in ("backend", "release"):
                        thread_destroy = value
                        continue
                case _:
                    continue
            log(Level.WARN, f"ignoring {key} = {mapping.shown(value)}")
        return cls(
            idle_ttl_ms,
            max_containers,
            thread_destroy,
            profile_by_user,
            profile_fallback,
            profile_conflicts,
        )


# The two parsers accept what Rust's `str::parse` does, so one config means
# the same to this policy and to the Rust ones: no surrounding spaces, no
# `_` separators (Python's own parsers allow both).


def _parse_float(value: str) -> float | None:
    if value != value.strip() or "_" in value:
        return None
    try:
        # NaN then fails `> 0` and is ignored like a typo.
        return float(value)
    except ValueError:
        return None


def _parse_count(value: str) -> int | None:
    digits = value.removeprefix("+")
    if digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _read_config() -> list[tuple[str, str]]:
    try:
        return store.get_all()
    except Err as e:
        # Without its settings the policy still serves, with defaults.
        log(Level.WARN, f"cannot read the policy config: {e.value}")
        return []


class Policy:
    """One instance's cache: the container last ensured for each backend."""

    def __init__(self) -> None:
        self._containers: dict[str, str] = {}
        # Read on first use, then fixed for the instance's life.
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_config(_read_config())
        return self._settings

    # --- the exports -------------------------------------------------------

    def profile(self, backend: str) -> str:
        """The operator's profile of the backend's user (pure: config only)."""
        return self.settings.profile_of(mapping.check_own_backend(backend))

    def ensure_container(self, backend: str) -> Container:
        """A running container for the backend: adopted when the host already
        labelled one, started when it was only created, re-created when it
        stopped or vanished."""
        mapping.check_own_backend(backend)
        who = mapping.describe(backend)
        found = self._lookup(backend, who)
        if found is None:
            container = self._create_and_start(backend, who)
        elif found.status == ContainerStatus.RUNNING:
            container = found
        elif found.status == ContainerStatus.CREATED:
            # Never started (a concurrent host may be about to start it):
            # start it rather than throw it away.
            container = self._start_or_recreate(backend, found, who)
        else:
            status = found.status.name.lower()
            log(Level.INFO, f"Container for {who} is {status}, recreating it")
            containers.remove(found.id)
            container = self._create_and_start(backend, who)
        self._containers[backend] = container.id
        return container

    def release_thread(self, thread_id: str) -> bool:
        """By default the thread's backend (the whole user's container) goes;
        with thread_destroy = "release", only once no thread is left on it.
        The host has already dropped this thread from `threads`."""
        backend = mapping.backend_id(thread_id)
        if self.settings.thread_destroy == "backend":
            return self._destroy_backend(backend)
        who = mapping.describe(backend)
        found = self._lookup(backend, who)
        if found is None:
            self._containers.pop(backend, None)
            return False
        if found.threads > 0:
            log(
                Level.DEBUG,
                f"Kept container for {who}: {found.threads} thread(s) still use it",
            )
            return False
        return self._remove_backend_container(backend, found, who)

    def destroy_user(self, user_id: str) -> bool:
        """The user's one backend is the user id: remove its container and
        forget it. False when the user had none."""
        return self._destroy_backend(mapping.check_user(user_id))

    def maintain(self, dry_run: bool) -> list[Removal]:
        """Containers idle longer than the TTL, then the least recently used
        beyond the capacity; never one with work in flight. A dry run
        returns the plan and removes nothing; a real run returns the
        removals done (a removal the host refuses is skipped)."""
        plan = self._plan()
        if dry_run:
            return plan
        return [removal for removal in plan if self._execute(removal)]

    # --- decisions -----------------------------------------------------------

    def _plan(self) -> list[Removal]:
        settings = self.settings
        if settings.idle_ttl_ms is None and settings.max_containers is None:
            return []
        now = now_ms()
        live = containers.list()
        plan: list[Removal] = []
        if settings.idle_ttl_ms is not None:
            ttl = settings.idle_ttl_ms

            def idle_for(c: Container) -> int:
                return max(0, now - c.last_used_ms)

            idle = [c for c in live if c.in_flight == 0 and idle_for(c) > ttl]
            plan += [_removal(c, f"idle {idle_for(c) // 1000}s") for c in idle]
            # What stays idle-wise still counts towards the capacity.
            live = [c for c in live if not (c.in_flight == 0 and idle_for(c) > ttl)]
        if settings.max_containers is not None:
            plan += _evictions(live, settings.max_containers)
        return plan

    def _execute(self, removal: Removal) -> bool:
        """Carries out one planned removal: whether the container went."""
        try:
            removed = containers.remove(removal.container_id)
        except Err as e:
            if not isinstance(e.value, Error_Refused):
                raise
            # Work started on it since the policy looked: it stays.
            log(
                Level.WARN,
                f"Kept container of backend {removal.backend_id} ({removal.reason}): "
                f"the host refused to remove it: {e.value.value}",
            )
            return False
        self._forget_container(removal.container_id)
        if removed:
            log(
                Level.INFO,
                f"Removed container of backend {removal.backend_id} ({removal.reason})",
            )
        return removed

    # --- Docker, through the host --------------------------------------------

    def _lookup(self, backend: str, who: str) -> Container | None:
        """The cached container if it still exists, else the one the host
        labelled for the backend (adoption)."""
        cached = self._containers.get(backend)
        if cached is not None:
            container = containers.inspect(cached)
            if container is not None:
                return container
        found = containers.find(backend)
        if found is not None:
            log(Level.DEBUG, f"Adopted container {found.name} for {who}")
        return found

    def _destroy_backend(self, backend: str) -> bool:
        who = mapping.describe(backend)
        found = self._lookup(backend, who)
        if found is None:
            self._containers.pop(backend, None)
            return False
        return self._remove_backend_container(backend, found, who)

    def _remove_backend_container(
        self, backend: str, container: Container, who: str
    ) -> bool:
        removed = containers.remove(container.id)
        self._containers.pop(backend, None)
        if removed:
            log(Level.INFO, f"Destroyed container for {who}")
        return removed

    def _forget_container(self, container_id: str) -> None:
        self._containers = {
            b: c for b, c in self._containers.items() if c != container_id
        }

    def _start_or_recreate(self, backend: str, container: Container, who: str) -> Container:
        try:
            containers.start(container.id)
        except Err as e:
            if not isinstance(e.value, Error_NotFound):
                raise
            # Removed between our look and our start: make a new one.
            return self._create_and_start(backend, who)
        container.status = ContainerStatus.RUNNING
        return container

    def _create_and_start(self, backend: str, who: str) -> Container:
        # Make room first, so a new backend never pushes the count past the
        # capacity (busy containers count but are never chosen).
        max_containers = self.settings.max_containers
        if max_containers is not None:
            for eviction in _evictions(containers.list(), max_containers, backend):
                self._execute(eviction)
        # The host derives name, image and workspace; a name race with
        # another host returns the winner's container instead of failing.
        container = containers.create(backend)
        if container.status != ContainerStatus.RUNNING:
            containers.start(container.id)
            container.status = ContainerStatus.RUNNING
        log(Level.INFO, f"Created container for {who}")
        return container


def _evictions(
    live: list[Container], max_containers: int, making_room_for: str | None = None
) -> list[Removal]:
    """The least recently used of `live` beyond the capacity; when making
    room for a new container of a backend, beyond `max - 1` others."""
    room = max_containers
    if making_room_for is not None:
        live = [c for c in live if c.backend_id != making_room_for]
        room -= 1
    excess = max(0, len(live) - room)
    idle = sorted((c for c in live if c.in_flight == 0), key=lambda c: c.last_used_ms)
    return [_removal(c, f"capacity {max_containers}") for c in idle[:excess]]


def _removal(c: Container, reason: str) -> Removal:
    return Removal(container_id=c.id, backend_id=c.backend_id, reason=reason)
