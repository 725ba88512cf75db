"""deepagents backends over `sandbox serve`: one per conversation thread.

Install with ``pip install "sandbox-client[deepagents]"``. The seed's
``DockerSandboxBackend`` functions keep their names and meaning, so a caller
changes one import::

    from sandbox_client.deepagents import (
        get_thread_backend, destroy_thread_backend, destroy_user_backend)

    backend = get_thread_backend("alice-7f3a")   # the user's shared sandbox
    agent = create_deep_agent(model=..., backend=backend)

They talk to the server at ``SANDBOX_URL`` (default ``http://127.0.0.1:8765``)
with the token ``SANDBOX_TOKEN``, or to what :func:`configure` set. The file
tools of deepagents' ``BaseSandbox`` run ``python3`` inside the sandbox: run the
server with the Python-ready image (``sandbox image build --python``,
``SANDBOX_IMAGE=sandbox-python:latest``).
"""

from __future__ import annotations

import os
import shlex
import threading
from typing import Any, List, Optional, Tuple

from deepagents.backends import protocol
from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse
from deepagents.backends.sandbox import BaseSandbox

from .api import ExecResult
from .client import AsyncSandboxClient, SandboxClient

__all__ = [
    "SandboxBackend",
    "configure",
    "get_thread_backend",
    "destroy_thread_backend",
    "destroy_user_backend",
]


class SandboxBackend(BaseSandbox):
    """deepagents' ``SandboxBackendProtocol`` for one thread of `sandbox serve`.

    ``id`` is the backend id: the user id under the per-user policy, so every
    thread of a user shares one container and one ``/workspace``. Paths are
    absolute, anywhere the sandbox user may go in the container; a relative
    path is ``invalid_path``, as the protocol says. The async methods use
    ``async_client`` (one is made from ``client``'s settings when omitted):
    no thread per call.
    """

    def __init__(self, client: SandboxClient, thread_id: str, *,
                 async_client: Optional[AsyncSandboxClient] = None):
        self._client = client
        self._async = async_client or AsyncSandboxClient(
            client.base_url, client.token, client.timeout, connect_timeout=client.connect_timeout,
            write_timeout=client.write_timeout, pool_timeout=client.pool_timeout, retries=client.retries)
        self._thread_id = thread_id
        # Checks the id now (a bad one raises SandboxError); the container
        # itself is created lazily, by the first command.
        self._backend = client.thread_backend(thread_id)

    @property
    def id(self) -> str:
        return self._backend["id"]

    @property
    def thread_id(self) -> str:
        return self._thread_id

    @property
    def user_id(self) -> str:
        return self._backend["user_id"]

    # -- execute -------------------------------------------------------------

    @staticmethod
    def _timeout(timeout: Optional[int]) -> Optional[float]:
        # The protocol lets 0 mean "no timeout" where a backend supports it;
        # this one always bounds a command, so 0 gets the server's default.
        return float(timeout) if timeout else None

    @staticmethod
    def _response(result: ExecResult) -> ExecuteResponse:
        output = result.output
        if result.exit_code == 127 and "python3" in output and "not found" in output:
            # deepagents' file tools run python3 in the sandbox: say what to do.
            output += ("\n[sandbox: this sandbox's image has no python3, which deepagents' file tools need: "
                       "run the server with --image sandbox-python:latest (built by `sandbox image build --python`)]")
        return ExecuteResponse(output=output, exit_code=result.exit_code, truncated=result.truncated)

    def execute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:
        """Runs ``command`` with ``sh -c``: combined output (capped head and
        tail, ``truncated`` set when cut), exit code (124 when the timeout
        killed its process tree)."""
        return self._response(self._client.exec(self._thread_id, command, timeout=self._timeout(timeout)))

    async def aexecute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:  # noqa: ASYNC109
        return self._response(await self._async.exec(self._thread_id, command, timeout=self._timeout(timeout)))

    # -- files ---------------------------------------------------------------

    def upload_files(self, files: List[Tuple[str, bytes]]) -> List[FileUploadResponse]:
        """Writes each file (parents created) as the sandbox user, raw bytes
        streamed; one response per file, in order."""
        return [
            FileUploadResponse(path=path, error="invalid_path" if not path.startswith("/")
                               else self._client.upload_file(self._thread_id, path, content))
            for path, content in files
        ]

    async def aupload_files(self, files: List[Tuple[str, bytes]]) -> List[FileUploadResponse]:
        out = []
        for path, content in files:
            error = "invalid_path" if not path.startswith("/") else \
                await self._async.upload_file(self._thread_id, path, content)
            out.append(FileUploadResponse(path=path, error=error))
        return out

    def download_files(self, paths: List[str]) -> List[FileDownloadResponse]:
        """Reads each file as the sandbox user; one response per path, in
        order, with its bytes or a per-file error."""
        absolute = [p for p in paths if p.startswith("/")]
        got = iter(self._client.download_files(self._thread_id, absolute) if absolute else [])
        return [_download(next(got)) if p.startswith("/") else _invalid(p) for p in paths]

    async def adownload_files(self, paths: List[str]) -> List[FileDownloadResponse]:
        absolute = [p for p in paths if p.startswith("/")]
        got = iter(await self._async.download_files(self._thread_id, absolute) if absolute else [])
        return [_download(next(got)) if p.startswith("/") else _invalid(p) for p in paths]

    if hasattr(protocol, "DeleteResult"):  # deepagents 0.7 added delete

        async def adelete(self, file_path: str) -> "protocol.DeleteResult":
            """``delete`` through :meth:`aexecute` (the protocol's default runs
            the sync one on a thread)."""
            quoted = shlex.quote(file_path)
            probe = await self.aexecute(f"test -e {quoted} || test -L {quoted}")
            if probe.exit_code not in (None, 0):
                return protocol.DeleteResult(error=f"Error: '{file_path}' not found")
            removed = await self.aexecute(f"rm -rf -- {quoted}")
            if removed.exit_code == 0:
                return protocol.DeleteResult(path=file_path)
            detail = removed.output.strip() or "unknown error"
            return protocol.DeleteResult(error=f"Error deleting file '{file_path}': {detail}")

    # -- lifecycle -----------------------------------------------------------

    def destroy(self) -> bool:
        """Destroys this thread's backend (under per-user: the user's
        container; its workspace stays). False when there was none."""
        return self._client.destroy_thread(self._thread_id)


def _download(r: dict) -> FileDownloadResponse:
    return FileDownloadResponse(path=r["path"], content=r["content"], error=r["error"])


def _invalid(path: str) -> FileDownloadResponse:
    return FileDownloadResponse(path=path, content=None, error="invalid_path")


# -- the seed's module-level functions ----------------------------------------

_lock = threading.Lock()
_clients: Optional[Tuple[SandboxClient, AsyncSandboxClient]] = None


def _make(base_url: Optional[str], token: Optional[str], options: Any) -> Tuple[SandboxClient, AsyncSandboxClient]:
    base_url = base_url or os.environ.get("SANDBOX_URL", "http://127.0.0.1:8765")
    token = token if token is not None else os.environ.get("SANDBOX_TOKEN")
    return SandboxClient(base_url, token, **options), AsyncSandboxClient(base_url, token, **options)


def configure(base_url: Optional[str] = None, token: Optional[str] = None, **options: Any) -> None:
    """Points the module-level functions at a server (default:
    ``SANDBOX_URL``, ``SANDBOX_TOKEN``). ``options`` go to both clients
    (``timeout``, ``connect_timeout``, ``retries``...). Backends already
    handed out keep the clients they were made with."""
    global _clients
    with _lock:
        _clients = _make(base_url, token, options)


def _default() -> Tuple[SandboxClient, AsyncSandboxClient]:
    global _clients
    with _lock:
        if _clients is None:
            _clients = _make(None, None, {})
        return _clients


def get_thread_backend(thread_id: str) -> SandboxBackend:
    """The backend of a conversation thread (``{user_id}-{rest}``): under the
    per-user policy, every thread of a user gets the same sandbox, created
    lazily by its first command."""
    client, async_client = _default()
    return SandboxBackend(client, thread_id, async_client=async_client)


def destroy_thread_backend(thread_id: str) -> bool:
    """Destroys the backend a thread uses (the whole user's container under
    per-user, after the grace period for running commands). False when there
    was none."""
    return _default()[0].destroy_thread(thread_id)


def destroy_user_backend(user_id: str) -> bool:
    """Destroys a user's container; the workspace stays. False when there was
    none."""
    return _default()[0].destroy_user(user_id)
