"""langchain-tests' standard deepagents sandbox suite, unmodified, sync and
async, against a real `sandbox serve` running the Python-ready image.

`cargo test-all` runs it with the deepagents release the pinned suite was
written for (see the `conformance` extra): deepagents 0.7 changed two
BaseSandbox behaviours the suite asserts (`write` now overwrites an existing
file; `glob` answers absolute paths), which no backend can change.
"""

import pytest
from langchain_tests.integration_tests import SandboxIntegrationTests

from sandbox_client.deepagents import SandboxBackend


class TestSandboxStandard(SandboxIntegrationTests):
    """Subclassed as Daytona, Runloop, Modal and LangSmith do: one fixture."""

    @pytest.fixture(scope="class")
    def sandbox(self, python_server):
        client = python_server.client()
        backend = SandboxBackend(client, "suite-1", async_client=python_server.async_client())
        try:
            yield backend
        finally:
            client.destroy_user("suite")
            client.close()
