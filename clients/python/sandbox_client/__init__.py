"""Client for `sandbox serve`: per-user Docker sandboxes for AI agents.

Standard library only. Two layers:

* :class:`SandboxClient`, one method per HTTP endpoint;
* :class:`DockerSandbox`, a deepagents ``BaseSandbox``-style backend for one
  conversation thread (``id``, ``execute``, ``upload_files``,
  ``download_files``), usable without deepagents installed.

>>> client = SandboxClient("http://127.0.0.1:8765", token="...")   # doctest: +SKIP
>>> sandbox = DockerSandbox(client, "alice-7f3a")                   # doctest: +SKIP
>>> sandbox.execute("echo hi").output                               # doctest: +SKIP
'hi\\n'
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "SandboxClient",
    "SandboxError",
    "DockerSandbox",
    "ExecuteResponse",
    "FileUploadResponse",
    "FileDownloadResponse",
]


class SandboxError(Exception):
    """An error answered by the server: HTTP status, error kind, message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message


@dataclass
class ExecuteResponse:
    """deepagents' ``ExecuteResponse``: combined output, exit code, truncation."""

    output: str
    exit_code: Optional[int]
    truncated: bool
    timed_out: bool = False


@dataclass
class FileUploadResponse:
    path: str
    error: Optional[str]  # file_not_found | permission_denied | is_directory | invalid_path


@dataclass
class FileDownloadResponse:
    path: str
    content: Optional[bytes]
    error: Optional[str]
    mode: Optional[int] = None


class SandboxClient:
    """One method per endpoint of `sandbox serve` (see its openapi.json)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8765", token: Optional[str] = None, timeout: float = 900.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
                 content_type: str = "application/json", headers: Optional[Dict[str, str]] = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                err = json.loads(payload)["error"]
                raise SandboxError(e.code, err["kind"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise SandboxError(e.code, "http", payload.decode(errors="replace")) from None

    def _json(self, method: str, path: str, body: Any = None, **kw) -> Any:
        with self._request(method, path, body, **kw) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _thread(thread_id: str) -> str:
        return urllib.parse.quote(thread_id, safe="")

    # -- endpoints --------------------------------------------------------

    def thread_backend(self, thread_id: str) -> Dict[str, str]:
        """The (lazily created) backend of a thread: id, user_id, workspace."""
        return self._json("GET", f"/v1/threads/{self._thread(thread_id)}")

    @staticmethod
    def _exec_body(command: str, timeout: Optional[float] = None, env: Optional[Dict[str, str]] = None,
                   workdir: Optional[str] = None, stdin: Optional[str] = None,
                   execution_id: Optional[str] = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {"command": command}
        if timeout is not None:
            body["timeout_secs"] = timeout
        if env:
            body["env"] = env
        if workdir is not None:
            body["workdir"] = workdir
        if stdin is not None:
            body["stdin"] = stdin
        if execution_id is not None:
            body["execution_id"] = execution_id
        return body

    def exec(self, thread_id: str, command: str, timeout: Optional[float] = None,
             env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
             stdin: Optional[str] = None, execution_id: Optional[str] = None) -> Dict[str, Any]:
        """Runs a command; the answer has ``execution_id`` and, when the host
        ended the command, ``reason`` (``timeout``, ``cancelled``, ``destroyed``).
        Give ``execution_id`` (8 to 64 of ``[A-Za-z0-9_-]``) to be able to
        :meth:`cancel` it from another thread."""
        body = self._exec_body(command, timeout, env, workdir, stdin, execution_id)
        return self._json("POST", f"/v1/threads/{self._thread(thread_id)}/exec", body)

    def exec_stream(self, thread_id: str, command: str, timeout: Optional[float] = None,
                    env: Optional[Dict[str, str]] = None, workdir: Optional[str] = None,
                    stdin: Optional[str] = None, execution_id: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Yields NDJSON lines: ``started`` (with the ``execution_id``), ``output``
        chunks, then ``exit`` (or ``error``)."""
        body = self._exec_body(command, timeout, env, workdir, stdin, execution_id)
        resp = self._request("POST", f"/v1/threads/{self._thread(thread_id)}/exec/stream", body)
        with resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    def cancel(self, execution_id: str) -> bool:
        """Kills a running execution's whole process tree; it then answers
        exit code 130 with ``reason`` ``cancelled``. False when no execution
        with that id runs on the server."""
        try:
            return self._json("DELETE", f"/v1/executions/{urllib.parse.quote(execution_id, safe='')}")["cancelled"]
        except SandboxError as e:
            if e.status == 404:
                return False
            raise

    def upload_files(self, thread_id: str, files: Sequence[Tuple[str, bytes]]) -> List[Dict[str, Any]]:
        body = {"files": [{"path": p, "content_b64": base64.b64encode(c).decode()} for p, c in files]}
        return self._json("PUT", f"/v1/threads/{self._thread(thread_id)}/files", body)["results"]

    def download_files(self, thread_id: str, paths: Sequence[str]) -> List[Dict[str, Any]]:
        query = urllib.parse.urlencode([("path", p) for p in paths])
        results = self._json("GET", f"/v1/threads/{self._thread(thread_id)}/files?{query}")["results"]
        for r in results:
            r["content"] = base64.b64decode(r["content_b64"]) if r.get("content_b64") is not None else None
        return results

    def destroy_user(self, user_id: str) -> bool:
        return self._json("DELETE", f"/v1/users/{urllib.parse.quote(user_id, safe='')}")["destroyed"]

    def destroy_thread(self, thread_id: str) -> bool:
        return self._json("DELETE", f"/v1/threads/{self._thread(thread_id)}")["destroyed"]

    def backends(self) -> Dict[str, Any]:
        return self._json("GET", "/v1/backends")

    def gc(self, dry_run: bool = False) -> Dict[str, Any]:
        return self._json("POST", f"/v1/gc?dry_run={'true' if dry_run else 'false'}")

    def health(self) -> Dict[str, Any]:
        return self._json("GET", "/healthz")

    def metrics(self) -> str:
        with self._request("GET", "/metrics") as resp:
            return resp.read().decode()

    def openapi(self) -> Dict[str, Any]:
        return self._json("GET", "/openapi.json")

    def policy(self) -> str:
        return self._json("GET", "/v1/policy")["policy"]

    def swap_policy(self, component: bytes, name: Optional[str] = None) -> str:
        """Swaps the running policy live; raises SandboxError (422) if refused."""
        headers = {"X-Policy-Name": name} if name else None
        return self._json("POST", "/v1/policy", raw=component, content_type="application/wasm",
                          headers=headers)["policy"]


class DockerSandbox:
    """A deepagents ``BaseSandbox``-style backend for one thread.

    ``id`` is the backend id (the user id under the per-user policy): all
    threads of a user share one container and one ``/workspace``.
    """

    def __init__(self, client: SandboxClient, thread_id: str, timeout: Optional[float] = None):
        self.client = client
        self.thread_id = thread_id
        self.timeout = timeout
        self._backend = client.thread_backend(thread_id)

    @property
    def id(self) -> str:
        return self._backend["id"]

    def execute(self, command: str) -> ExecuteResponse:
        r = self.client.exec(self.thread_id, command, timeout=self.timeout)
        return ExecuteResponse(r["output"], r["exit_code"], r["truncated"], r.get("timed_out", False))

    def upload_files(self, files: List[Tuple[str, bytes]]) -> List[FileUploadResponse]:
        return [FileUploadResponse(r["path"], r["error"]) for r in self.client.upload_files(self.thread_id, files)]

    def download_files(self, paths: List[str]) -> List[FileDownloadResponse]:
        return [FileDownloadResponse(r["path"], r["content"], r["error"], r.get("mode"))
                for r in self.client.download_files(self.thread_id, paths)]
