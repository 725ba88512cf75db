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

import hashlib
import os
import re
import shlex
import threading
from typing import Any, Dict, List, Optional, Tuple

from deepagents.backends import protocol
from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse
from deepagents.backends.sandbox import BaseSandbox

from .api import ExecResult, SandboxError
from .client import AsyncSandboxClient, SandboxClient

__all__ = [
    "SandboxBackend",
    "RunSandboxBackend",
    "thread_id_for",
    "configure",
    "get_thread_backend",
    "destroy_thread_backend",
    "destroy_user_backend",
]


#: What a user id may be (the server's rule, checked here too so that a
#: constructor needs no server).
_USER = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
#: What the part of a thread id after ``{user}-`` may be.
_REST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_RULE = ("a thread id is USER or USER-REST: USER 1-64 of a-z 0-9 _, REST 1-128 of A-Z a-z 0-9 _ -, "
         "each starting with a letter or digit")


def _check_thread_id(thread_id: str) -> None:
    user, _, rest = thread_id.partition("-")
    if not _USER.fullmatch(user) or ("-" in thread_id and not _REST.fullmatch(rest)):
        raise SandboxError(400, "invalid-id", f"thread id {thread_id!r}: {_RULE}")


def thread_id_for(user_id: str, thread_id: str) -> str:
    """The sandbox thread id of a LangGraph thread of ``user_id``:
    ``{user_id}-{thread_id}``, whatever ``thread_id`` holds (a UUID, a name
    with spaces or dots): characters outside ``[A-Za-z0-9_-]`` become ``_``
    and, when anything was changed or cut, a short hash of the original is
    appended, so two different LangGraph ids never share a thread id. The
    user id is never changed: one that breaks the rule is refused."""
    if not _USER.fullmatch(user_id):
        raise SandboxError(400, "invalid-id",
                           f"user id {user_id!r}: a user id is 1-64 of a-z 0-9 _, starting with a letter or digit")
    rest = re.sub(r"[^A-Za-z0-9_-]", "_", str(thread_id))
    if not rest or not rest[0].isalnum() or not rest.isascii():
        rest = "t" + rest
    if rest != str(thread_id) or len(rest) > 128:
        digest = hashlib.sha256(str(thread_id).encode()).hexdigest()[:12]
        rest = f"{rest[:128 - 13]}-{digest}"
    return f"{user_id}-{rest}"


class SandboxBackend(BaseSandbox):
    """deepagents' ``SandboxBackendProtocol`` for one thread of `sandbox serve`.

    ``SandboxBackend(client, thread_id)`` takes a sandbox thread id
    (``{user}-{rest}``: the user is the text before the first ``-``);
    ``SandboxBackend(client, user_id=..., thread_id=...)`` composes one from a
    user id and any LangGraph thread id (:func:`thread_id_for`), so
    unrelated UUIDs never share a sandbox.

    The constructor makes no call: the id is checked here, the container is
    created by the first command. ``id`` is the backend id (the user id
    under the per-user policy, so every thread of a user shares one
    container and one ``/workspace``), asked of the server on first use;
    :meth:`acreate` asks it without blocking. Paths are absolute, anywhere
    the sandbox user may go in the container; a relative path is
    ``invalid_path``, as the protocol says. The async methods use
    ``async_client`` (one is made from ``client``'s settings when omitted):
    no thread per call.
    """

    def __init__(self, client: SandboxClient, thread_id: Optional[str] = None, *,
                 user_id: Optional[str] = None, async_client: Optional[AsyncSandboxClient] = None):
        if thread_id is None:
            raise TypeError("SandboxBackend needs a thread_id")
        if user_id is not None:
            thread_id = thread_id_for(user_id, thread_id)
        _check_thread_id(thread_id)
        self._client = client
        self._async = async_client or AsyncSandboxClient(
            client.base_url, client.token, client.timeout, connect_timeout=client.connect_timeout,
            write_timeout=client.write_timeout, pool_timeout=client.pool_timeout, retries=client.retries)
        self._thread_id = thread_id
        self._backend: Optional[Dict[str, str]] = None

    @classmethod
    async def acreate(cls, client: SandboxClient, thread_id: Optional[str] = None, *,
                      user_id: Optional[str] = None,
                      async_client: Optional[AsyncSandboxClient] = None) -> "SandboxBackend":
        """The backend, with its id asked of the server without blocking the
        event loop (an unreachable server raises :class:`SandboxError` here)."""
        backend = cls(client, thread_id, user_id=user_id, async_client=async_client)
        backend._backend = await backend._async.thread_backend(backend._thread_id)
        return backend

    def _described(self) -> Dict[str, str]:
        if self._backend is None:
            self._backend = self._client.thread_backend(self._thread_id)
        return self._backend

    @property
    def id(self) -> str:
        return self._described()["id"]

    @property
    def thread_id(self) -> str:
        return self._thread_id

    @property
    def user_id(self) -> str:
        return self._thread_id.partition("-")[0]

    # -- execute -------------------------------------------------------------

    @staticmethod
    def _timeout(timeout: Optional[int]) -> Optional[float]:
        # The protocol lets 0 mean "no timeout" where a backend supports it;
        # this one always bounds a command, so 0 gets the server's default.
        return float(timeout) if timeout else None

    @staticmethod
    def _response(result: ExecResult, timeout: Optional[float] = None) -> ExecuteResponse:
        output = result.output
        # The model reads words, not a bare exit code.
        limit = f" after {timeout:g} seconds" if timeout else " (the server's limit)"
        said = {
            "timeout": f"Command timed out{limit}; every process it started was killed.",
            "cancelled": "Command was cancelled; every process it started was killed.",
            "destroyed": "Command was killed: its sandbox was destroyed while it ran.",
            "oom": "Command was killed: out of memory (the sandbox's memory limit).",
        }.get(result.reason or "")
        if said:
            output = f"{output.rstrip()}\n[{said}]" if output.strip() else f"[{said}]"
        if result.exit_code == 127 and "python3" in output and "not found" in output:
            # deepagents' file tools run python3 in the sandbox: say what to do.
            output += ("\n[sandbox: this sandbox's image has no python3, which deepagents' file tools need: "
                       "run the server with --image sandbox-python:latest (built by `sandbox image build --python`)]")
        return ExecuteResponse(output=output, exit_code=result.exit_code, truncated=result.truncated)

    def execute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:
        """Runs ``command`` with ``sh -c``: combined output (capped head and
        tail, ``truncated`` set when cut), exit code (124 when the timeout
        killed its process tree, said in words too). A server that cannot be
        reached is a failed command the model reads, not an exception."""
        try:
            result = self._client.exec(self._thread_id, command, timeout=self._timeout(timeout))
        except SandboxError as e:
            return _unreachable(e)
        return self._response(result, self._timeout(timeout))

    async def aexecute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:  # noqa: ASYNC109
        try:
            result = await self._async.exec(self._thread_id, command, timeout=self._timeout(timeout))
        except SandboxError as e:
            return _unreachable(e)
        return self._response(result, self._timeout(timeout))

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


class RunSandboxBackend(BaseSandbox):
    """One backend for a compiled agent that serves many users: every call
    works in the sandbox of the run it belongs to, read from the run's
    LangGraph config (``config["configurable"]``): its ``thread_id`` and the
    user id under ``user_key`` (``user_id`` by default; LangGraph Platform's
    ``langgraph_auth_user_id`` too). The sandbox thread id is
    :func:`thread_id_for` of the two; without a user id, ``thread_id`` must be
    a sandbox thread id itself (``{user}-{rest}``).

    ::

        agent = create_deep_agent(model=..., backend=RunSandboxBackend(client))
        agent.invoke(inputs, config={"configurable": {"thread_id": tid, "user_id": "alice"}})

    deepagents 0.7 removed backend factories; this is one instance whose
    calls route per run (through LangGraph's context), safe across
    concurrent runs.
    """

    def __init__(self, client: Optional[SandboxClient] = None, *,
                 async_client: Optional[AsyncSandboxClient] = None, user_key: str = "user_id"):
        if client is None:
            client, async_client = _default()
        if async_client is None:
            # One pool for every run's backend, not one each.
            async_client = AsyncSandboxClient(
                client.base_url, client.token, client.timeout, connect_timeout=client.connect_timeout,
                write_timeout=client.write_timeout, pool_timeout=client.pool_timeout, retries=client.retries)
        self._client = client
        self._async = async_client
        self._user_key = user_key
        self._lock = threading.Lock()
        self._backends: Dict[Tuple[Optional[str], str], SandboxBackend] = {}

    def current(self) -> SandboxBackend:
        """The backend of the run this call belongs to."""
        try:
            from langgraph.config import get_config
            configurable = get_config().get("configurable", {})
        except (ImportError, RuntimeError) as e:
            raise SandboxError(0, "no-run", "RunSandboxBackend is used outside a LangGraph run: "
                                            f"pass config={{'configurable': {{'thread_id': ..., "
                                            f"'{self._user_key}': ...}}}} ({e})") from None
        thread = configurable.get("thread_id")
        user = configurable.get(self._user_key) or configurable.get("langgraph_auth_user_id")
        if thread is None:
            raise SandboxError(0, "no-thread", "the run's config has no configurable thread_id")
        key = (str(user) if user is not None else None, str(thread))
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = SandboxBackend(self._client, key[1], user_id=key[0], async_client=self._async)
                self._backends[key] = backend
            return backend

    @property
    def id(self) -> str:
        return self.current().id

    def execute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:
        return self.current().execute(command, timeout=timeout)

    async def aexecute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:  # noqa: ASYNC109
        return await self.current().aexecute(command, timeout=timeout)

    def upload_files(self, files: List[Tuple[str, bytes]]) -> List[FileUploadResponse]:
        return self.current().upload_files(files)

    async def aupload_files(self, files: List[Tuple[str, bytes]]) -> List[FileUploadResponse]:
        return await self.current().aupload_files(files)

    def download_files(self, paths: List[str]) -> List[FileDownloadResponse]:
        return self.current().download_files(paths)

    async def adownload_files(self, paths: List[str]) -> List[FileDownloadResponse]:
        return await self.current().adownload_files(paths)

    if hasattr(protocol, "DeleteResult"):

        async def adelete(self, file_path: str) -> "protocol.DeleteResult":
            return await self.current().adelete(file_path)


def _unreachable(e: SandboxError) -> ExecuteResponse:
    """A call the server never answered, as a failed command; other errors
    (a refused id, a bad token) are the application's and raise."""
    if e.kind not in ("unreachable", "timeout", "broken-transfer"):
        raise e
    return ExecuteResponse(output=f"[The sandbox could not run the command: {e}]", exit_code=125, truncated=False)


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
