"""The per-user placement policy in Python: the `placement` export of the
`sandbox` world (wit/sandbox.wit), built with componentize-py.

It behaves like the host's embedded Rust per-user policy
(guest/per-user over guest/policy-core): every thread `{user}-{rest}` shares
its user's backend (id = user id), container and workspace; containers are
created lazily, adopted from the host's labels on a cache miss, re-created
when stopped or vanished; `idle_ttl_secs`, `max_containers` and
`thread_destroy` come from the deployment's `[policy_config]`, and so do
the users' profiles (`profile`, `profile.NAME`).

This module only wires the exports: mapping.py holds the ids and the
thread -> backend mapping, lifecycle.py the cache and every decision.
Errors are componentize-py `Err(types.Error_*)` exceptions, which become the
export's typed `result` error; any other exception traps the instance, and
the host re-instantiates it (its cache is rebuilt by adoption).
"""

from wit_world import exports
from wit_world.imports.types import Container, Removal

import mapping
from lifecycle import Policy

# componentize-py creates the export class anew for each call, so the
# instance's state lives at module level: one cache per component instance.
_POLICY = Policy()


class Placement(exports.Placement):
    def name(self) -> str:
        return mapping.NAME

    def backend_id(self, thread_id: str) -> str:
        return mapping.backend_id(thread_id)

    def profile(self, backend_id: str) -> str:
        return _POLICY.profile(backend_id)

    def ensure_container(self, backend_id: str) -> Container:
        return _POLICY.ensure_container(backend_id)

    def release_thread(self, thread_id: str) -> bool:
        return _POLICY.release_thread(thread_id)

    def destroy_user(self, user_id: str) -> bool:
        return _POLICY.destroy_user(user_id)

    def maintain(self, dry_run: bool) -> list[Removal]:
        return _POLICY.maintain(dry_run)
