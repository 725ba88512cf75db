"""The smallest complete per-user policy, in Python: every thread
``{user}-{rest}`` of a user shares one container (and the user's workspace).

It keeps no cache: each call asks the host for the container it labelled
for the backend. guest/python-per-user is the full policy (a cache, idle
and capacity limits, typed logs); this one is what the README shows.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import containers
from wit_world.imports.types import Container, ContainerStatus, Error_InvalidId, Removal


class Placement(exports.Placement):
    def name(self) -> str:
        return "python-minimal"

    def backend_id(self, thread_id: str) -> str:
        # The host checks every id; a thread id always has a user part.
        user = thread_id.split("-", 1)[0]
        if not user:
            raise Err(Error_InvalidId(f"{thread_id[:64]!r} has no user part"))
        return user

    def profile(self, backend_id: str) -> str:
        # The host's top-level settings for everyone; a policy could give
        # some users a profile the operator defined ("trusted", say).
        return "default"

    def ensure_container(self, backend_id: str) -> Container:
        found = containers.find(backend_id)
        if found is not None and found.status == ContainerStatus.RUNNING:
            return found
        if found is not None:
            # Stopped, or created and never started: start afresh.
            containers.remove(found.id)
        created = containers.create(backend_id)
        containers.start(created.id)
        running = containers.inspect(created.id)
        return running if running is not None else created

    def release_thread(self, thread_id: str) -> bool:
        # The compatibility wrapper: a thread's destroy is its user's.
        return self.destroy_user(self.backend_id(thread_id))

    def destroy_user(self, user_id: str) -> bool:
        found = containers.find(user_id)
        return found is not None and containers.remove(found.id)

    def maintain(self, dry_run: bool) -> list[Removal]:
        # No idle or capacity rules: nothing to remove.
        return []
