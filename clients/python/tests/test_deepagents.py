"""deepagents (the current release) on a real `sandbox serve` running the
Python-ready image: the module-level functions of the seed, the async
methods, and a whole agent run with a scripted model in two threads of one
user. The standard suite is in test_standard_suite.py."""

import pathlib
import sys
import threading

import pytest

from sandbox_client import deepagents as sd
from sandbox_client.deepagents import SandboxBackend

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def configured(python_server):
    sd.configure(python_server.url, python_server.token, timeout=120)
    yield python_server
    sd._clients = None


def test_the_seed_functions_share_one_sandbox_per_user(configured):
    a, b = sd.get_thread_backend("dana-1"), sd.get_thread_backend("dana-2")
    assert (a.id, b.id) == ("dana", "dana")
    assert a.upload_files([("/workspace/shared.txt", b"from dana-1")])[0].error is None
    assert b.execute("cat /workspace/shared.txt").output == "from dana-1"
    assert sd.get_thread_backend("erin-1").execute("cat /workspace/shared.txt").exit_code != 0
    assert sd.destroy_thread_backend("dana-2") is True
    assert sd.destroy_user_backend("dana") is False
    # The workspace outlives the container; the next command re-creates it.
    assert a.execute("cat /workspace/shared.txt").output == "from dana-1"
    assert sd.destroy_user_backend("dana") is True
    sd.destroy_user_backend("erin")


def test_relative_paths_are_invalid_without_a_request(configured):
    backend = sd.get_thread_backend("dana-1")
    assert backend.upload_files([("rel.txt", b"x")])[0].error == "invalid_path"
    got = backend.download_files(["rel.txt", "/nope/missing"])
    assert [r.error for r in got] == ["invalid_path", "file_not_found"]
    sd.destroy_user_backend("dana")


async def test_async_methods_use_no_threads(configured):
    backend = sd.get_thread_backend("fay-1")
    await backend.aexecute("true")
    before = threading.active_count()
    result = await backend.aexecute("echo hi")
    up = await backend.aupload_files([("/tmp/a.bin", b"\x00\xff")])
    down = await backend.adownload_files(["/tmp/a.bin"])
    assert (result.output, up[0].error, down[0].content) == ("hi\n", None, b"\x00\xff")
    assert threading.active_count() == before
    assert (await backend.adelete("/tmp/a.bin")).error is None
    assert (await backend.adelete("/tmp/a.bin")).error is not None
    sd.destroy_user_backend("fay")


def test_a_deep_agent_in_two_threads_of_one_user(configured):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import deepagents_two_threads as example
    finally:
        sys.path.remove(str(EXAMPLES))
    results = example.main()
    first, second = results["alice-1"], results["alice-2"]
    assert [t["tool"] for t in first] == ["write_file", "execute", "read_file"]
    assert "hello from /workspace as uid" in first[1]["result"]
    assert "hello from /workspace" in first[2]["result"]
    # The second thread sees the first one's files: one workspace per user.
    assert "hello.py" in second[0]["result"] and "out.txt" in second[0]["result"]
    assert "hello from /workspace" in second[1]["result"]
    assert "hello from" in second[2]["result"]
    sd.destroy_user_backend("alice")


def test_a_missing_python3_says_which_image_to_use(configured):
    # As on the busybox image, where deepagents' file tools fail with only
    # "python3: not found".
    backend = sd.get_thread_backend("dana-1")
    response = backend.execute("PATH=/nonexistent python3 -c 'print(1)'")
    assert response.exit_code == 127
    assert "sandbox-python:latest" in response.output and "sandbox image build --python" in response.output
    assert "python3" not in backend.execute("echo fine").output
    sd.destroy_user_backend("dana")


def test_the_constructor_makes_no_call_and_ids_are_composed_for_any_langgraph_thread():
    from sandbox_client import SandboxClient, SandboxError
    from sandbox_client.deepagents import thread_id_for
    nowhere = SandboxClient("http://127.0.0.1:9", retries=0, connect_timeout=1)
    backend = SandboxBackend(nowhere, "alice-1")  # no server: no call, no error
    assert (backend.thread_id, backend.user_id) == ("alice-1", "alice")
    # An unreachable server is a failed command the model reads.
    down = backend.execute("true")
    assert down.exit_code == 125 and "could not run the command" in down.output and "127.0.0.1:9" in down.output
    with pytest.raises(SandboxError) as refused:
        SandboxBackend(nowhere, "Alice-1")
    assert "a thread id is USER or USER-REST" in str(refused.value)
    uuid_a, uuid_b = "7f3a9c1e-0000-4000-8000-000000000001", "7f3a9c1e-0000-4000-8000-000000000002"
    a, b = SandboxBackend(nowhere, user_id="ana", thread_id=uuid_a), SandboxBackend(nowhere, user_id="ana", thread_id=uuid_b)
    assert a.thread_id == f"ana-{uuid_a}" and a.thread_id != b.thread_id and a.user_id == "ana"
    odd = thread_id_for("ana", "chat #1 (draft)")
    assert odd.startswith("ana-chat__1__draft_-") and odd != thread_id_for("ana", "chat #1 (draft!)")
    assert len(thread_id_for("ana", "x" * 500)) <= 4 + 128
    with pytest.raises(SandboxError):
        thread_id_for("Ana", uuid_a)


def test_a_timeout_reaches_the_model_in_words(configured):
    backend = sd.get_thread_backend("gus-1")
    response = backend.execute("echo started; sleep 30", timeout=1)
    assert response.exit_code == 124
    assert "started" in response.output and "Command timed out after 1 seconds" in response.output, response.output
    sd.destroy_user_backend("gus")


def test_one_compiled_agent_serves_two_users_and_three_threads_at_once(configured):
    """LangGraph-style: one agent, the user and thread in each run's config."""
    from concurrent.futures import ThreadPoolExecutor

    from deepagents import create_deep_agent
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from sandbox_client.deepagents import RunSandboxBackend

    class StepModel(BaseChatModel):
        """Writes a note named after the run, lists the workspace, answers."""

        @property
        def _llm_type(self) -> str:
            return "steps"

        def bind_tools(self, tools, **kwargs):
            return self

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            name = next(m.content for m in messages if isinstance(m, HumanMessage))
            done = sum(isinstance(m, ToolMessage) for m in messages)
            steps = [
                ("write_file", {"file_path": f"/workspace/{name}.txt", "content": name}),
                ("execute", {"command": "ls /workspace; echo user=$(id -u)"}),
            ]
            if done < len(steps):
                tool, args = steps[done]
                message = AIMessage(content="", tool_calls=[
                    {"name": tool, "args": args, "id": f"{name}-{done}", "type": "tool_call"}])
            else:
                message = AIMessage(content=f"{name} done")
            return ChatResult(generations=[ChatGeneration(message=message)])

    client, async_client = sd._default()
    agent = create_deep_agent(model=StepModel(), backend=RunSandboxBackend(client, async_client=async_client))
    runs = [("hal", "2b0c5e1a-1111-4000-8000-00000000000a", "hal_a"),
            ("hal", "2b0c5e1a-1111-4000-8000-00000000000b", "hal_b"),
            ("ivy", "2b0c5e1a-1111-4000-8000-00000000000a", "ivy_a")]  # same UUID, another user

    def run(user, thread, name):
        state = agent.invoke({"messages": [{"role": "user", "content": name}]},
                             config={"configurable": {"thread_id": thread, "user_id": user}})
        return [str(m.content) for m in state["messages"] if isinstance(m, ToolMessage)]

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip([r[2] for r in runs], pool.map(lambda r: run(*r), runs)))
    for name, tools in results.items():
        print(name, tools)
        assert f"{name}.txt" in tools[1], (name, tools)
    # Each user has one workspace: hal's two threads share it, ivy's is apart.
    hal = SandboxBackend(client, user_id="hal", thread_id="check")
    ivy = SandboxBackend(client, user_id="ivy", thread_id="check")
    assert set(hal.execute("ls /workspace").output.split()) >= {"hal_a.txt", "hal_b.txt"}
    assert "hal_a.txt" not in ivy.execute("ls /workspace").output
    assert (hal.id, ivy.id) == ("hal", "ivy")
    sd.destroy_user_backend("hal")
    sd.destroy_user_backend("ivy")


def test_a_large_tool_result_is_offloaded_into_the_sandbox(configured):
    """deepagents writes a large result to /large_tool_results/{call id}
    through the backend and keeps a preview in the conversation; the
    sandbox user can, and the file holds the whole result."""
    from deepagents import create_deep_agent
    from langchain_core.messages import AIMessage, ToolMessage
    sys.path.insert(0, str(EXAMPLES))
    try:
        from deepagents_two_threads import ScriptedModel
    finally:
        sys.path.remove(str(EXAMPLES))
    backend = sd.get_thread_backend("kim-1")
    script = [
        AIMessage(content="", tool_calls=[{"name": "execute", "id": "call-big-1", "type": "tool_call",
                                           "args": {"command": "head -c 1000000 /dev/zero | tr '\\0' a; echo"}}]),
        AIMessage(content="done"),
    ]
    agent = create_deep_agent(model=ScriptedModel(messages=iter(script)), backend=backend)
    state = agent.invoke({"messages": [{"role": "user", "content": "make a big output"}]})
    tool = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    print(f"the conversation keeps {len(str(tool.content))} characters: {str(tool.content)[:300]!r}")
    assert len(str(tool.content)) < 50_000, "the result stayed in the conversation whole"
    assert "/large_tool_results/" in str(tool.content)
    saved = backend.execute("wc -c < /large_tool_results/call-big-1; ls -ld /large_tool_results")
    print(saved.output)
    assert int(saved.output.split()[0]) >= 1_000_000, saved.output
    sd.destroy_user_backend("kim")
