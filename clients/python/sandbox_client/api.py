"""The HTTP API of `sandbox serve` as plain values, with no I/O.

Each endpoint is a function that returns a :class:`Call` (method, path,
body, how to read the answer). :class:`~sandbox_client.SandboxClient` sends
calls with httpx's sync client, :class:`~sandbox_client.AsyncSandboxClient`
with its async one: the two share every rule written here.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote

__all__ = ["Call", "SandboxError", "FILE_ERRORS", "ExecResult"]

#: The per-file error literals of the deepagents protocol, plus this
#: server's ``file_too_large``.
FILE_ERRORS = frozenset({"file_not_found", "permission_denied", "is_directory", "invalid_path", "file_too_large"})

#: Headroom on top of a command's own timeout before the client gives up
#: reading its answer (the server answers a timed-out command itself).
EXEC_READ_MARGIN_SECS = 30.0


class SandboxError(Exception):
    """A failed call: the HTTP status (0 when no answer arrived), the
    server's error kind (``invalid-id``, ``unauthorized``...; ``unreachable``
    or ``timeout`` when the server could not be reached or did not answer in
    time) and its message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"{status} {kind}: {message}" if status else f"{kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message


def error_from_response(status: int, payload: bytes) -> SandboxError:
    """The :class:`SandboxError` of a non-2xx answer (the server's JSON
    error shape, or the raw text of anything else in between)."""
    try:
        err = json.loads(payload)["error"]
        return SandboxError(status, str(err["kind"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return SandboxError(status, "http", payload[:1000].decode(errors="replace"))


@dataclass
class ExecResult:
    """A finished command: the combined ``output`` (text, arrival order,
    capped head and tail), ``stdout`` and ``stderr`` separately (bytes, each
    capped the same way: exactly as the command wrote them when the exec
    asked for ``binary``, else the UTF-8 of their text, invalid sequences
    replaced), the exit code, why it was ended when the host or the kernel
    ended it (``timeout``, ``cancelled``, ``destroyed``, ``oom``), and how
    many background processes still held its output when it exited and
    were killed so that it could end (``background_killed``)."""

    output: str
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    timed_out: bool = False
    execution_id: str = ""
    reason: Optional[str] = None
    background_killed: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "ExecResult":
        def raw(name: str) -> bytes:
            if body.get(name + "_b64") is not None:
                return base64.b64decode(body[name + "_b64"])
            return str(body.get(name) or "").encode()

        return cls(
            output=body.get("output", ""),
            exit_code=int(body["exit_code"]),
            stdout=raw("stdout"),
            stderr=raw("stderr"),
            truncated=bool(body.get("truncated", False)),
            timed_out=bool(body.get("timed_out", False)),
            execution_id=body.get("execution_id", ""),
            reason=body.get("reason"),
            background_killed=int(body.get("background_killed", 0)),
        )

    # Mapping-style access, so code written against the 0.2 dict answers
    # (``r["output"]``) keeps working.
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.__dataclass_fields__ else default


@dataclass
class Call:
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    json: Any = None
    content: Optional[Union[bytes, Any]] = None
    params: List[Tuple[str, str]] = field(default_factory=list)
    headers: Dict[str, str] = field(default_factory=dict)
    #: Seconds to wait for the answer (httpx's read timeout); ``None``:
    #: the client's default.
    read_timeout: Optional[float] = None
    #: Turns the JSON answer into the method's result.
    parse: Callable[[Any], Any] = lambda body: body
    #: 4xx kinds that are an answer, not an error (per-file errors).
    answers: frozenset = frozenset()
    #: Whether the answer is JSON (else ``parse`` gets the text).
    json_answer: bool = True


def _seg(value: str) -> str:
    return quote(value, safe="")


def thread_backend(thread_id: str) -> Call:
    return Call("GET", f"/v1/threads/{_seg(thread_id)}")


def exec_body(command: str, timeout: Optional[float], env: Optional[Mapping[str, str]], workdir: Optional[str],
              stdin: Optional[Union[str, bytes]], execution_id: Optional[str], binary: bool) -> Dict[str, Any]:
    body: Dict[str, Any] = {"command": command}
    if timeout is not None:
        body["timeout_secs"] = timeout
    if env:
        body["env"] = dict(env)
    if workdir is not None:
        body["workdir"] = workdir
    if isinstance(stdin, (bytes, bytearray)):
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    elif stdin is not None:
        body["stdin"] = stdin
    if execution_id is not None:
        body["execution_id"] = execution_id
    if binary:
        body["encoding"] = "base64"
    return body


def exec_read_timeout(timeout: Optional[float], default: float) -> float:
    return (timeout if timeout is not None else default) + EXEC_READ_MARGIN_SECS


def exec_call(thread_id: str, body: Dict[str, Any], read_timeout: float) -> Call:
    return Call("POST", f"/v1/threads/{_seg(thread_id)}/exec", json=body, read_timeout=read_timeout,
                parse=ExecResult.from_json)


def exec_stream_call(thread_id: str, body: Dict[str, Any], read_timeout: float) -> Call:
    return Call("POST", f"/v1/threads/{_seg(thread_id)}/exec/stream", json=body, read_timeout=read_timeout)


def stream_line(raw: Union[str, bytes]) -> Optional[Dict[str, Any]]:
    """One NDJSON line of a streamed exec, or ``None`` for a blank line.
    Output ``data`` is text, or bytes when the exec asked for ``binary``;
    the ``exit`` line also carries its :class:`ExecResult` as ``result``."""
    if not raw.strip():
        return None
    line = json.loads(raw)
    if line.get("type") == "output" and line.get("data_b64") is not None:
        line["data"] = base64.b64decode(line.pop("data_b64"))
    elif line.get("type") == "exit":
        line["result"] = ExecResult.from_json(line)
    return line


def cancel(thread_id: str, execution_id: str) -> Call:
    """Execution ids are scoped per user: any thread of the user names one."""
    path = f"/v1/threads/{_seg(thread_id)}/executions/{_seg(execution_id)}"
    return Call("DELETE", path, parse=lambda b: bool(b["cancelled"]),
                answers=frozenset({"not-found"}))


def upload_file(thread_id: str, path: str, content: Any, mode: Optional[int]) -> Call:
    """One file, raw bytes in the body: binary-safe, not capped by the JSON
    body limit (the server's file cap applies)."""
    params = [("path", path)]
    if mode is not None:
        params.append(("mode", format(mode, "o")))
    return Call("PUT", f"/v1/threads/{_seg(thread_id)}/files/raw", content=content, params=params,
                headers={"Content-Type": "application/octet-stream"}, answers=FILE_ERRORS)


def download_file(thread_id: str, path: str) -> Call:
    return Call("GET", f"/v1/threads/{_seg(thread_id)}/files/raw", params=[("path", path)], answers=FILE_ERRORS)


def destroy_user(user_id: str) -> Call:
    return Call("DELETE", f"/v1/users/{_seg(user_id)}", parse=lambda b: bool(b["destroyed"]))


def destroy_thread(thread_id: str) -> Call:
    return Call("DELETE", f"/v1/threads/{_seg(thread_id)}", parse=lambda b: bool(b["destroyed"]))


def backends() -> Call:
    return Call("GET", "/v1/backends")


def preview_link(thread_id: str, port: int, ttl_secs: Optional[int]) -> Call:
    body: Dict[str, Any] = {"thread_id": thread_id, "port": port}
    if ttl_secs is not None:
        body["ttl_secs"] = ttl_secs
    return Call("POST", "/v1/previews", json=body)


def preview(thread_id: str, port: int, path: str) -> Call:
    return Call(
        "GET",
        f"/v1/threads/{_seg(thread_id)}/ports/{int(port)}/{path.lstrip('/')}",
        json_answer=False,
    )


def start_process(thread_id: str, command: str, env: Optional[Mapping[str, str]], workdir: Optional[str],
                  timeout: Optional[float], terminal: Optional[Tuple[int, int]]) -> Call:
    body: Dict[str, Any] = {"command": command}
    if env:
        body["env"] = dict(env)
    if workdir is not None:
        body["workdir"] = workdir
    if timeout is not None:
        body["timeout_secs"] = timeout
    if terminal is not None:
        body["terminal"] = {"rows": int(terminal[0]), "cols": int(terminal[1])}
    return Call("POST", f"/v1/threads/{_seg(thread_id)}/processes", json=body)


def processes(thread_id: str) -> Call:
    return Call("GET", f"/v1/threads/{_seg(thread_id)}/processes", parse=lambda b: b["processes"])


def _process_path(thread_id: str, process_id: str, rest: str = "") -> str:
    return f"/v1/threads/{_seg(thread_id)}/processes/{_seg(process_id)}{rest}"


def process_chunks(body: Mapping[str, Any]) -> Dict[str, Any]:
    """Decodes the chunks of a process's output to bytes (``data``)."""
    out = dict(body)
    out["chunks"] = [process_chunk(c) for c in body.get("chunks", [])]
    return out


def process_chunk(chunk: Mapping[str, Any]) -> Dict[str, Any]:
    c = dict(chunk)
    c["data"] = base64.b64decode(c.pop("data_b64", "") or "")
    return c


def process_output(thread_id: str, process_id: str, stdout_offset: int, stderr_offset: int,
                   wait: float) -> Call:
    params = [("stdout_offset", str(int(stdout_offset))), ("stderr_offset", str(int(stderr_offset))),
              ("wait_secs", str(float(wait))), ("encoding", "base64")]
    return Call("GET", _process_path(thread_id, process_id), params=params, parse=process_chunks,
                read_timeout=wait + EXEC_READ_MARGIN_SECS)


def follow_process(thread_id: str, process_id: str, stdout_offset: int, stderr_offset: int) -> Call:
    params = [("stdout_offset", str(int(stdout_offset))), ("stderr_offset", str(int(stderr_offset))),
              ("follow", "true"), ("encoding", "base64")]
    # Each read waits up to 25 s server-side, so a line comes at least that often.
    return Call("GET", _process_path(thread_id, process_id), params=params, read_timeout=60.0)


def process_line(raw: Union[str, bytes]) -> Optional[Dict[str, Any]]:
    """One NDJSON line of a followed process (``output`` with ``data`` as
    bytes, then ``exit`` with ``process``, or ``error``); ``None`` for a blank line."""
    if not raw.strip():
        return None
    line = json.loads(raw)
    if line.get("type") == "output":
        line = process_chunk(line)
    return line


def _no_content(_: str) -> None:
    return None


def write_process(thread_id: str, process_id: str, data: Optional[Union[str, bytes]], close: bool) -> Call:
    body: Dict[str, Any] = {"close": bool(close)}
    if isinstance(data, (bytes, bytearray)):
        body["data_b64"] = base64.b64encode(data).decode()
    elif data is not None:
        body["data"] = data
    return Call("POST", _process_path(thread_id, process_id, "/stdin"), json=body, json_answer=False,
                parse=_no_content)


def signal_process(thread_id: str, process_id: str, signal: str) -> Call:
    return Call("POST", _process_path(thread_id, process_id, "/signal"), json={"signal": str(signal)},
                json_answer=False, parse=_no_content)


def resize_process(thread_id: str, process_id: str, rows: int, cols: int) -> Call:
    return Call("POST", _process_path(thread_id, process_id, "/resize"), json={"rows": int(rows), "cols": int(cols)},
                json_answer=False, parse=_no_content)


def remove_process(thread_id: str, process_id: str) -> Call:
    return Call("DELETE", _process_path(thread_id, process_id), json_answer=False, parse=_no_content)


def gc(dry_run: bool) -> Call:
    return Call("POST", "/v1/gc", params=[("dry_run", "true" if dry_run else "false")])


def health() -> Call:
    return Call("GET", "/healthz")


def metrics() -> Call:
    return Call("GET", "/metrics", json_answer=False)


def openapi() -> Call:
    return Call("GET", "/openapi.json")


def policy() -> Call:
    return Call("GET", "/v1/policy", parse=lambda b: b["policy"])


def swap_policy(component: bytes, name: Optional[str]) -> Call:
    headers = {"Content-Type": "application/wasm"}
    if name:
        headers["X-Policy-Name"] = name
    return Call("POST", "/v1/policy", content=component, headers=headers, parse=lambda b: b["policy"])
