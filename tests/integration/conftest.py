"""Fixtures for the integration tests: real peers on loopback and the agent as a subprocess.

* ``certs`` (session): a throwaway CA, server and client certificates.
* ``h2_server``, ``grpc_server``, ``nginx`` (module): upstream peers, each in its own thread or process.
* ``agent`` (function) / ``module_agent`` (module): factories ``make(config, name=...) -> Agent``; every agent
  they start is stopped at teardown. When a test fails, the log tail of every agent still running is
  attached to its report (section "agent log").
* ``dead_port``: a TCP port nothing listens on (for connect-failure tests).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `peers` and `nginx` import the same whether or not tests/ is a package
    sys.path.insert(0, str(_HERE))

from nginx import NginxServer  # noqa: E402
from peers.agent import LIVE_AGENTS, Agent, AgentError  # noqa: E402  # needs the sys.path entry above
from peers.certs import CertBundle, make_certs  # noqa: E402
from peers.grpc_server import GrpcEchoServer  # noqa: E402
from peers.h2_server import H2Server  # noqa: E402

AgentFactory = Callable[..., Agent]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and LIVE_AGENTS:
        for agent in sorted(LIVE_AGENTS, key=lambda a: a.name):
            report.sections.append((f"agent log: {agent.name} ({agent.workdir})", agent.log_tail()))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def h2_server(certs: CertBundle) -> Iterator[H2Server]:
    with H2Server(certs=certs) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcEchoServer]:
    with GrpcEchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """``NginxServer`` (tests/integration/nginx.py): ``port`` (HTTP/1.1), ``h2c_port``, ``tls_port``."""
    with NginxServer(tmp_path_factory.mktemp("nginx")) as server:
        yield server


def _factory(workdir: Callable[[str], Path]) -> Iterator[AgentFactory]:
    started: list[Agent] = []
    counter = [0]

    def make(config: dict[str, Any], name: str | None = None, **kwargs: Any) -> Agent:
        counter[0] += 1
        agent_name = name or f"agent{counter[0]}"
        agent = Agent(config, workdir(agent_name), name=agent_name, **kwargs)
        started.append(agent)
        return agent.start()

    yield make
    unclean = []
    for agent in started:
        rc = agent.stop()
        if agent.ready and rc not in (0, None):
            unclean.append(f"{agent.name} exited with {rc}:\n{agent.log_tail(30)}")
    if unclean:  # SIGTERM must drain and exit 0 (docs/operations.md); a crash must not go unnoticed
        raise AgentError("agent did not exit cleanly on SIGTERM:\n" + "\n".join(unclean))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentFactory]:
    """``agent(config, name=None, **Agent kwargs) -> Agent`` (started, ready); stopped after the test."""
    yield from _factory(lambda name: tmp_path / name)


@pytest.fixture(scope="module")
def module_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentFactory]:
    """Like ``agent`` but the agents live for the whole module."""
    yield from _factory(lambda name: tmp_path_factory.mktemp(name))


@pytest.fixture
def dead_port() -> int:
    """A loopback TCP port with no listener (bound, read back, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
