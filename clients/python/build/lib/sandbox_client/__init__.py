"""Client for `sandbox serve`: per-user Docker sandboxes for AI agents.

* :class:`SandboxClient` and :class:`AsyncSandboxClient`: one method per
  HTTP endpoint, over pooled httpx clients; every failure is a
  :class:`SandboxError`.
* :mod:`sandbox_client.deepagents` (``pip install "sandbox-client[deepagents]"``):
  ``SandboxBackend``, a deepagents ``BaseSandbox`` for one conversation
  thread, and the seed's ``get_thread_backend`` / ``destroy_thread_backend``
  / ``destroy_user_backend``.

>>> client = SandboxClient("http://127.0.0.1:8765", token="...")   # doctest: +SKIP
>>> r = client.exec("alice-7f3a", "echo hi; echo oops >&2")         # doctest: +SKIP
>>> r.output, r.stdout, r.stderr, r.exit_code                       # doctest: +SKIP
('hi\\noops\\n', b'hi\\n', b'oops\\n', 0)
"""

from .api import FILE_ERRORS, ExecResult, SandboxError
from .client import AsyncSandboxClient, SandboxClient

__all__ = ["SandboxClient", "AsyncSandboxClient", "SandboxError", "ExecResult", "FILE_ERRORS"]
