"""A deepagents agent on `sandbox serve`, with no model service.

Two conversation threads of one user (``alice-1``, ``alice-2``) each run a
deep agent whose chat model is scripted (langchain_core's fake chat model
answering with tool calls). The first thread writes a Python file, runs it
with ``execute`` and reads what it printed; the second thread finds both
files in the same workspace and runs the program again.

Run a server with the Python-ready image, then this::

    sandbox image build --python
    SANDBOX_IMAGE=sandbox-python:latest sandbox serve --token secret &
    SANDBOX_TOKEN=secret python examples/deepagents_two_threads.py
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Dict, List

from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage

from sandbox_client.deepagents import get_thread_backend

PROGRAM = "import os\nprint('hello from', os.getcwd(), 'as uid', os.getuid())\n"


class ScriptedModel(GenericFakeChatModel):
    """Answers with the next scripted message; tools are ignored (the
    script already names them)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> "ScriptedModel":
        return self


_ids = itertools.count(1)


def call(tool: str, **args: Any) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": tool, "args": args, "id": f"call-{next(_ids)}", "type": "tool_call"}])


def run(thread_id: str, script: List[AIMessage]) -> List[Dict[str, str]]:
    """Runs one scripted turn in a thread; returns its tool results."""
    agent = create_deep_agent(model=ScriptedModel(messages=iter(script)), backend=get_thread_backend(thread_id))
    state = agent.invoke({"messages": [{"role": "user", "content": "run the hello program"}]})
    return [{"tool": m.name, "result": str(m.content)} for m in state["messages"] if isinstance(m, ToolMessage)]


def main() -> Dict[str, List[Dict[str, str]]]:
    get_thread_backend("alice-1").execute("rm -f /workspace/hello.py /workspace/out.txt")
    first = run("alice-1", [
        call("write_file", file_path="/workspace/hello.py", content=PROGRAM),
        call("execute", command="cd /workspace && python3 hello.py | tee out.txt"),
        call("read_file", file_path="/workspace/out.txt"),
        AIMessage(content="The program ran."),
    ])
    second = run("alice-2", [
        call("ls", path="/workspace"),
        call("read_file", file_path="/workspace/out.txt"),
        call("execute", command="python3 /workspace/hello.py"),
        AIMessage(content="Same workspace."),
    ])
    return {"alice-1": first, "alice-2": second}


if __name__ == "__main__":
    results = main()
    for thread, tools in results.items():
        print(f"== thread {thread} (backend {get_thread_backend(thread).id})")
        for t in tools:
            print(f"-- {t['tool']}:\n{t['result'].rstrip()}")
    sys.exit(0)
