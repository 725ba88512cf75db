"""Sync and async clients of `sandbox serve`, over httpx.

Both keep a pool of connections, use split timeouts (connect, read, write,
pool; an execute's read timeout follows its own timeout), retry only the
connection attempt (never a request the server may have started), and turn
every failure into :class:`~sandbox_client.SandboxError`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import IO, Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from . import api
from .api import Call, ExecResult, SandboxError

__all__ = ["SandboxClient", "AsyncSandboxClient"]

Content = Union[bytes, IO[bytes]]


class _Settings:
    """What both clients share: where the server is, how long to wait, and
    how a call becomes a request and an answer becomes a result."""

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None, timeout: float = 900.0,
                 *, connect_timeout: float = 10.0, write_timeout: float = 120.0, pool_timeout: float = 60.0,
                 retries: int = 3, max_connections: int = 100):
        # Unset, the environment decides, as for the CLI: SANDBOX_URL and
        # SANDBOX_TOKEN, else the server's default address.
        if base_url is None:
            base_url = os.environ.get("SANDBOX_URL") or "http://127.0.0.1:8765"
        if token is None:
            token = os.environ.get("SANDBOX_TOKEN") or None
        self.base_url = base_url.rstrip("/")
        self.token = token
        #: Seconds to wait for an answer (an execute waits for its own
        #: timeout, else this, plus a margin).
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.pool_timeout = pool_timeout
        self.retries = retries
        self.max_connections = max_connections

    def _client_options(self) -> Dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": self._timeout(None),
            "limits": httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=20),
        }

    def _timeout(self, read: Optional[float]) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_timeout, read=read if read is not None else self.timeout,
                             write=self.write_timeout, pool=self.pool_timeout)

    def _request(self, call: Call) -> Dict[str, Any]:
        return {
            "method": call.method,
            "url": call.path,
            "json": call.json,
            "content": call.content,
            "params": call.params or None,
            "headers": call.headers or None,
            "timeout": self._timeout(call.read_timeout),
        }

    @staticmethod
    def _result(call: Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise api.error_from_response(response.status_code, response.content)
        if not call.json_answer:
            return call.parse(response.text)
        try:
            body = response.json()
        except ValueError as e:
            raise SandboxError(response.status_code, "http", f"the answer is not JSON: {e}") from None
        return call.parse(body)

    def _exec(self, thread_id: str, command: str, timeout: Optional[float], env: Optional[Mapping[str, str]],
              workdir: Optional[str], stdin: Optional[Union[str, bytes]], execution_id: Optional[str],
              binary: bool, stream: bool) -> Call:
        body = api.exec_body(command, timeout, env, workdir, stdin, execution_id, binary)
        read = api.exec_read_timeout(timeout, self.timeout)
        return (api.exec_stream_call if stream else api.exec_call)(thread_id, body, read)


def _transport_error(e: httpx.HTTPError, base_url: str) -> SandboxError:
    """A failure with no (complete) answer from the server at ``base_url``."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return SandboxError(0, "unreachable",
                            f"cannot reach the server at {base_url} ({type(e).__name__}: {e}); is "
                            f"`sandbox serve` running there? SANDBOX_URL or base_url names another")
    if isinstance(e, httpx.TimeoutException):
        return SandboxError(0, "timeout", f"no answer in time from {base_url}: {type(e).__name__}: {e}")
    return SandboxError(0, "broken-transfer", f"{base_url}: {type(e).__name__}: {e}")


class SandboxClient(_Settings):
    """One method per endpoint of `sandbox serve` (see its ``/openapi.json``),
    over a pooled :class:`httpx.Client`. Thread-safe; close it (or use it as
    a context manager) to release its connections.

    >>> client = SandboxClient("http://127.0.0.1:8765", token="...")  # doctest: +SKIP
    >>> client.exec("alice-1", "echo hi").output                       # doctest: +SKIP
    'hi\\n'
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        transport = httpx.HTTPTransport(retries=self.retries)
        self._http = httpx.Client(transport=transport, **self._client_options())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SandboxClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, call: Call) -> Any:
        try:
            response = self._http.request(**self._request(call))
        except httpx.HTTPError as e:
            raise _transport_error(e, self.base_url) from None
        return self._result(call, response)

    # -- threads and executes ----------------------------------------------

    def thread_backend(self, thread_id: str) -> Dict[str, str]:
        """The (lazily created) backend of a thread: ``id``, ``user_id``,
        ``workspace``."""
        return self._send(api.thread_backend(thread_id))

    def exec(self, thread_id: str, command: str, timeout: Optional[float] = None,
             env: Optional[Mapping[str, str]] = None, workdir: Optional[str] = None,
             stdin: Optional[Union[str, bytes]] = None, execution_id: Optional[str] = None,
             binary: bool = False) -> ExecResult:
        """Runs ``command`` with ``sh -c`` in the thread's container.
        ``stdin`` may be text or bytes; ``binary`` asks for the exact bytes of
        stdout and stderr (else invalid UTF-8 is replaced). Give
        ``execution_id`` (8 to 64 of ``[A-Za-z0-9_-]``) to be able to
        :meth:`cancel` it from elsewhere."""
        return self._send(self._exec(thread_id, command, timeout, env, workdir, stdin, execution_id, binary, False))

    def exec_stream(self, thread_id: str, command: str, timeout: Optional[float] = None,
                    env: Optional[Mapping[str, str]] = None, workdir: Optional[str] = None,
                    stdin: Optional[Union[str, bytes]] = None, execution_id: Optional[str] = None,
                    binary: bool = False) -> Iterator[Dict[str, Any]]:
        """Yields the NDJSON lines of a streamed exec: ``started`` (with the
        ``execution_id``), ``output`` chunks (``stream``, ``data``), then
        ``exit`` (with ``result``, an :class:`ExecResult`) or ``error``.
        Leaving the loop early cancels the command."""
        call = self._exec(thread_id, command, timeout, env, workdir, stdin, execution_id, binary, True)
        yield from self._lines(call, api.stream_line)

    def _lines(self, call: Call, parse: Any) -> Iterator[Dict[str, Any]]:
        """The NDJSON lines of ``call``'s answer, each through ``parse``."""
        try:
            with self._http.stream(**self._request(call)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._result(call, response)
                for raw in response.iter_lines():
                    line = parse(raw)
                    if line is not None:
                        yield line
        except httpx.HTTPError as e:
            raise _transport_error(e, self.base_url) from None

    def cancel(self, thread_id: str, execution_id: str) -> bool:
        """Kills a running execution's whole process tree; it then answers
        exit code 130 with ``reason`` ``cancelled``. Execution ids are scoped
        per user: ``thread_id`` is any thread of the execution's user. False
        when that user runs no execution with that id on the server."""
        call = api.cancel(thread_id, execution_id)
        try:
            return self._send(call)
        except SandboxError as e:
            if e.kind in call.answers:
                return False
            raise

    # -- files ---------------------------------------------------------------

    def upload_file(self, thread_id: str, path: str, content: Content, mode: Optional[int] = None) -> Optional[str]:
        """Writes one file (absolute, or relative to ``/workspace``; parents
        created) as the sandbox user, streamed as raw bytes: ``content`` is
        bytes or a file opened in binary mode. Returns ``None``, or the
        per-file error (``file_not_found``, ``permission_denied``,
        ``is_directory``, ``invalid_path``, ``file_too_large``)."""
        call = api.upload_file(thread_id, path, content, mode)
        try:
            self._send(call)
            return None
        except SandboxError as e:
            if e.kind in call.answers:
                return e.kind
            raise

    def upload_files(self, thread_id: str, files: Sequence[Tuple[str, bytes]]) -> List[Dict[str, Any]]:
        """deepagents' batch upload: one ``{path, error}`` per file, in order."""
        return [{"path": path, "error": self.upload_file(thread_id, path, content)} for path, content in files]

    def download_to(self, thread_id: str, path: str, out: IO[bytes]) -> Optional[str]:
        """Streams one file into ``out`` (a binary file); server and client
        memory stay bounded whatever its size. Returns ``None``, or the
        per-file error; a transfer that breaks midway raises."""
        call = api.download_file(thread_id, path)
        try:
            with self._http.stream(**self._request(call)) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        self._result(call, response)
                    except SandboxError as e:
                        if e.kind in call.answers:
                            return e.kind
                        raise
                for chunk in response.iter_bytes():
                    out.write(chunk)
            return None
        except httpx.HTTPError as e:
            raise _transport_error(e, self.base_url) from None

    def download_files(self, thread_id: str, paths: Sequence[str]) -> List[Dict[str, Any]]:
        """deepagents' batch download: one ``{path, content, error}`` per
        path, in order (``content`` is bytes, or ``None`` on error)."""
        results = []
        for path in paths:
            call = api.download_file(thread_id, path)
            try:
                response = self._http.request(**self._request(call))
            except httpx.HTTPError as e:
                raise _transport_error(e, self.base_url) from None
            try:
                if response.status_code >= 400:
                    self._result(call, response)
                results.append({"path": path, "content": response.content, "error": None})
            except SandboxError as e:
                if e.kind not in call.answers:
                    raise
                results.append({"path": path, "content": None, "error": e.kind})
        return results

    # -- lifecycle and operations --------------------------------------------

    def destroy_user(self, user_id: str) -> bool:
        return self._send(api.destroy_user(user_id))

    def destroy_thread(self, thread_id: str) -> bool:
        return self._send(api.destroy_thread(thread_id))

    def backends(self) -> Dict[str, Any]:
        return self._send(api.backends())

    def preview_link(
        self, thread_id: str, port: int, ttl_secs: Optional[int] = None
    ) -> Dict[str, Any]:
        """A short-lived link (``{"url": "/v1/previews/.../", "expires_at":
        ...}``, the url relative to this server) to a server the thread's
        sandbox runs on ``port``, that a browser opens without the token."""
        return self._send(api.preview_link(thread_id, port, ttl_secs))

    def preview(self, thread_id: str, port: int, path: str = "") -> str:
        """A page of a server the thread's running sandbox serves on
        ``port`` (on its loopback; the sandbox needs no network)."""
        return self._send(api.preview(thread_id, port, path))

    # -- background processes and terminals --------------------------------

    def start_process(self, thread_id: str, command: str, env: Optional[Mapping[str, str]] = None,
                      workdir: Optional[str] = None, timeout: Optional[float] = None,
                      terminal: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        """Starts ``command`` in the background of the thread's sandbox (on a
        terminal of ``(rows, cols)`` when given) and returns the process:
        ``id``, ``running``, ``exit_code``, ``stdout_bytes``... It outlives
        this client; the sandbox's agent keeps its output (the first 16 KiB
        and the last 256 KiB of each stream)."""
        return self._send(api.start_process(thread_id, command, env, workdir, timeout, terminal))

    def processes(self, thread_id: str) -> List[Dict[str, Any]]:
        """The background processes of the thread's sandbox, oldest first."""
        return self._send(api.processes(thread_id))

    def process_output(self, thread_id: str, process_id: str, stdout_offset: int = 0,
                       stderr_offset: int = 0, wait: float = 0.0) -> Dict[str, Any]:
        """Output past the offsets (waiting up to ``wait`` seconds, at most
        30, for some): ``chunks`` (``stream``, ``offset``, ``data`` bytes),
        ``process``, and the next ``stdout_offset`` and ``stderr_offset``."""
        return self._send(api.process_output(thread_id, process_id, stdout_offset, stderr_offset, wait))

    def follow_process(self, thread_id: str, process_id: str, stdout_offset: int = 0,
                       stderr_offset: int = 0) -> Iterator[Dict[str, Any]]:
        """Yields ``output`` lines (``stream``, ``offset``, ``data`` bytes) as
        the process writes, then ``exit`` (with ``process``) once it ended."""
        call = api.follow_process(thread_id, process_id, stdout_offset, stderr_offset)
        yield from self._lines(call, api.process_line)

    def write_process(self, thread_id: str, process_id: str, data: Optional[Union[str, bytes]] = None,
                      close: bool = False) -> None:
        """Writes to the process's stdin (a terminal's input: ``"\\x03"`` is
        Ctrl-C); ``close`` closes it afterwards."""
        self._send(api.write_process(thread_id, process_id, data, close))

    def signal_process(self, thread_id: str, process_id: str, signal: str = "TERM") -> None:
        """Sends ``signal`` (``TERM``, ``INT``, ``KILL``...) to its whole tree."""
        self._send(api.signal_process(thread_id, process_id, signal))

    def resize_process(self, thread_id: str, process_id: str, rows: int, cols: int) -> None:
        self._send(api.resize_process(thread_id, process_id, rows, cols))

    def remove_process(self, thread_id: str, process_id: str) -> None:
        """Kills the process (its whole tree) if it runs, and forgets it."""
        self._send(api.remove_process(thread_id, process_id))

    def gc(self, dry_run: bool = False) -> Dict[str, Any]:
        return self._send(api.gc(dry_run))

    def health(self) -> Dict[str, Any]:
        return self._send(api.health())

    def metrics(self) -> str:
        return self._send(api.metrics())

    def openapi(self) -> Dict[str, Any]:
        return self._send(api.openapi())

    def policy(self) -> str:
        return self._send(api.policy())

    def swap_policy(self, component: bytes, name: Optional[str] = None) -> str:
        """Swaps the running policy live; raises SandboxError (422) if refused."""
        return self._send(api.swap_policy(component, name))


class AsyncSandboxClient(_Settings):
    """The async twin of :class:`SandboxClient`, over :class:`httpx.AsyncClient`.

    Connections belong to an event loop, so it keeps one pooled client per
    running loop: it may be shared by code that runs several loops (tests,
    ``asyncio.run`` called more than once). ``await client.aclose()`` closes
    the current loop's connections.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._clients: Dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._lock = threading.Lock()

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            # A client's open connections keep its loop alive, so a weak map
            # would never let go: forget the clients of closed loops (their
            # sockets went with the loop) each time a client is looked up.
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                transport = httpx.AsyncHTTPTransport(retries=self.retries)
                client = httpx.AsyncClient(transport=transport, **self._client_options())
                self._clients[loop] = client
            return client

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> "AsyncSandboxClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> Any:
        try:
            response = await self._http().request(**self._request(call))
        except httpx.HTTPError as e:
            raise _transport_error(e, self.base_url) from None
        return self._result(call, response)

    async def thread_backend(self, thread_id: str) -> Dict[str, str]:
        """See :meth:`SandboxClient.thread_backend`."""
        return await self._send(api.thread_backend(thread_id))

    async def exec(self, thread_id: str, command: str, timeout: Optional[float] = None,
                   env: Optional[Mapping[str, str]] = None, workdir: Optional[str] = None,
                   stdin: Optional[Union[str, bytes]] = None, execution_id: Optional[str] = None,
                   binary: bool = False) -> ExecResult:
        """See :meth:`SandboxClient.exec`."""
        call = self._exec(thread_id, command, timeout, env, workdir, stdin, execution_id, binary, False)
        return await self._send(call)

    async def exec_stream(self, thread_id: str, command: str, timeout: Optional[float] = None,
                          env: Optional[Mapping[str, str]] = None, workdir: Optional[str] = None,
                          stdin: Optional[Union[str, bytes]] = None, execution_id: Optional[str] = None,
                          binary: bool = False) -> AsyncIterator[Dict[str, Any]]:
        """See :meth:`SandboxClient.exec_stream`."""
        call = self._exec(thread_id, command, timeout, env, workdir, stdin, execution_id, binary, True)
        async for line in self._lines(call, api.stream_line):
            yield line

    async def _lines(self, call: Call, parse: Any) -> AsyncIterator[Dict[str, Any]]:
        """See :meth:`SandboxClient._lines`."""
        try:
            async with self._http().stream(**self._request(call)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._result(call, response)
                async for raw in response.aiter_lines():
                    line = parse(raw)
                    if line is not None:
                        yield line
        except httpx.HTTPError as e:
            raise _transport_error(e, self.base_url) from None

    async def cancel(self, thread_id: str, execution_id: str) -> bool:
        """See :meth:`SandboxClient.cancel`."""
        call = api.cancel(thread_id, execution_id)
        try:
            return await self._send(call)
        except SandboxError as e:
            if e.kind in call.answers:
                return False
            raise

    async def upload_file(self, thread_id: str, path: str, content: bytes, mode: Optional[int] = None) -> Optional[str]:
        """See :meth:`SandboxClient.upload_file` (bytes only)."""
        call = api.upload_file(thread_id, path, content, mode)
        try:
            await self._send(call)
            return None
        except SandboxError as e:
            if e.kind in call.answers:
                return e.kind
            raise

    async def upload_files(self, thread_id: str, files: Sequence[Tuple[str, bytes]]) -> List[Dict[str, Any]]:
        """See :meth:`SandboxClient.upload_files`."""
        return [{"path": path, "error": await self.upload_file(thread_id, path, content)} for path, content in files]

    async def download_files(self, thread_id: str, paths: Sequence[str]) -> List[Dict[str, Any]]:
        """See :meth:`SandboxClient.download_files`."""
        results = []
        for path in paths:
            call = api.download_file(thread_id, path)
            try:
                response = await self._http().request(**self._request(call))
            except httpx.HTTPError as e:
                raise _transport_error(e, self.base_url) from None
            try:
                if response.status_code >= 400:
                    self._result(call, response)
                results.append({"path": path, "content": response.content, "error": None})
            except SandboxError as e:
                if e.kind not in call.answers:
                    raise
                results.append({"path": path, "content": None, "error": e.kind})
        return results

    async def destroy_user(self, user_id: str) -> bool:
        return await self._send(api.destroy_user(user_id))

    async def destroy_thread(self, thread_id: str) -> bool:
        return await self._send(api.destroy_thread(thread_id))

    async def backends(self) -> Dict[str, Any]:
        return await self._send(api.backends())

    async def preview_link(
        self, thread_id: str, port: int, ttl_secs: Optional[int] = None
    ) -> Dict[str, Any]:
        """See :meth:`SandboxClient.preview_link`."""
        return await self._send(api.preview_link(thread_id, port, ttl_secs))

    async def preview(self, thread_id: str, port: int, path: str = "") -> str:
        """See :meth:`SandboxClient.preview`."""
        return await self._send(api.preview(thread_id, port, path))

    # -- background processes and terminals --------------------------------

    async def start_process(self, thread_id: str, command: str, env: Optional[Mapping[str, str]] = None,
                            workdir: Optional[str] = None, timeout: Optional[float] = None,
                            terminal: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        """See :meth:`SandboxClient.start_process`."""
        return await self._send(api.start_process(thread_id, command, env, workdir, timeout, terminal))

    async def processes(self, thread_id: str) -> List[Dict[str, Any]]:
        return await self._send(api.processes(thread_id))

    async def process_output(self, thread_id: str, process_id: str, stdout_offset: int = 0,
                             stderr_offset: int = 0, wait: float = 0.0) -> Dict[str, Any]:
        """See :meth:`SandboxClient.process_output`."""
        return await self._send(api.process_output(thread_id, process_id, stdout_offset, stderr_offset, wait))

    async def follow_process(self, thread_id: str, process_id: str, stdout_offset: int = 0,
                             stderr_offset: int = 0) -> AsyncIterator[Dict[str, Any]]:
        """See :meth:`SandboxClient.follow_process`."""
        call = api.follow_process(thread_id, process_id, stdout_offset, stderr_offset)
        async for line in self._lines(call, api.process_line):
            yield line

    async def write_process(self, thread_id: str, process_id: str, data: Optional[Union[str, bytes]] = None,
                            close: bool = False) -> None:
        await self._send(api.write_process(thread_id, process_id, data, close))

    async def signal_process(self, thread_id: str, process_id: str, signal: str = "TERM") -> None:
        await self._send(api.signal_process(thread_id, process_id, signal))

    async def resize_process(self, thread_id: str, process_id: str, rows: int, cols: int) -> None:
        await self._send(api.resize_process(thread_id, process_id, rows, cols))

    async def remove_process(self, thread_id: str, process_id: str) -> None:
        await self._send(api.remove_process(thread_id, process_id))

    async def health(self) -> Dict[str, Any]:
        return await self._send(api.health())
