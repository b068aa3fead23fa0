"""Start the emulated API server and run kopf operators against it, for integration tests.

Usage, with pytest-asyncio::

    @pytest.mark.asyncio
    async def test_something() -> None:
        async with emulated_cluster() as (url, kube):
            kube.create_object(FINETUNEJOBS, {"metadata": {"name": "j1"}, "spec": {}}, namespace="ns")
            async with running_operator(url, registry, namespaces=["ns"]) as operator:
                await kube.wait_for(lambda: kube.get_object("v1/configmaps", "ns", "j1-config"))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import weakref
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any, NamedTuple

import kmock
import kopf
from kopf._core.engines.indexing import OperatorIndexers  # kopf.operator(indexers=...) takes it; not exported

from .emulator import KubeEmulator


class Cluster(NamedTuple):
    url: str  # e.g. http://127.0.0.1:34567
    kube: KubeEmulator


@contextlib.asynccontextmanager
async def emulated_cluster(**options: Any) -> AsyncIterator[Cluster]:
    """Serve a fresh emulator on a free loopback port; fail the test if it answered 500 (i.e. had a bug).

    The options go to :class:`KubeEmulator`, e.g. ``bookmark_interval=0.1``.
    """
    async with KubeEmulator(**options) as kube, kmock.Server(kube) as server:
        try:
            yield Cluster(str(server.url).rstrip("/"), kube)
            if kube.errors:
                raise ExceptionGroup("The emulated API server failed on some requests", list(kube.errors))
        finally:
            kube.stop_watches()  # or aiohttp waits for the watching handlers at shutdown
            await asyncio.sleep(0)


def fast_settings() -> kopf.OperatorSettings:
    """Operator settings for tests: quick retries and timeouts instead of minutes."""
    settings = kopf.OperatorSettings()
    settings.execution.default_backoff = 0.2  # retry failed handlers quickly (default: 60 s)
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]  # retry 5xx quickly (default: 1 to 21 s)
    settings.networking.request_timeout = 10
    settings.posting.default_backoffs = [0.1, 0.2]
    settings.watching.connect_timeout = 2
    settings.watching.reconnect_backoff = 0.05
    settings.persistence.consistency_timeout = 2
    settings.queueing.exit_timeout = 0.5
    return settings


@dataclasses.dataclass
class OperatorRun:
    """A kopf operator running in its own thread; readable from the test while it runs."""

    stop_flag: threading.Event
    indexers: OperatorIndexers
    thread: threading.Thread = dataclasses.field(default_factory=threading.Thread)
    failure: BaseException | None = None

    @property
    def indices(self) -> Mapping[str, kopf.Index[Any, Any]]:
        """The operator's in-memory indices by handler id, e.g. ``run.indices['pods_by_job']``."""
        return self.indexers.indices

    def _main(self, options: dict[str, Any]) -> None:
        try:
            asyncio.run(kopf.operator(**options))
        except BaseException as e:
            self.failure = e


_servers: weakref.WeakKeyDictionary[kopf.OperatorRegistry, list[kopf.ConnectionInfo]] = (
    weakref.WeakKeyDictionary()
)


def _log_in(registry: kopf.OperatorRegistry, connection: kopf.ConnectionInfo) -> None:
    """Register (once per registry) a login handler that points kopf at the current API server."""
    if registry not in _servers:
        server = _servers[registry] = [connection]

        @kopf.on.login(registry=registry, id="test-api-server")
        async def login(**_: Any) -> kopf.ConnectionInfo:
            return server[0]

    _servers[registry][0] = connection


@contextlib.asynccontextmanager
async def running_operator(
    api: str | kopf.ConnectionInfo,
    registry: kopf.OperatorRegistry,
    *,
    namespaces: Collection[str] = (),
    clusterwide: bool = False,
    settings: kopf.OperatorSettings | None = None,
    startup_timeout: float = 10,
    **kwargs: Any,
) -> AsyncIterator[OperatorRun]:
    """Run ``kopf.operator()`` (standalone: no peering) until the block exits.

    ``api`` is the emulator's URL, or a real API server with the operator's credentials.

    It runs in a thread with its own event loop: when stopping, kopf waits (up to 5 s) for, then cancels,
    every task created in its loop since its start; in the test's loop, those would include the emulator's
    request handlers and the test's own tasks. Extra kwargs go to ``kopf.operator()``, e.g. ``memo``.
    The ``indices`` of the yielded run are the operator's indices, for assertions.
    """
    _log_in(
        registry,
        kopf.ConnectionInfo(server=api, default_namespace="default") if isinstance(api, str) else api,
    )
    ready, run = threading.Event(), OperatorRun(threading.Event(), kwargs.pop("indexers", OperatorIndexers()))
    options = dict(registry=registry, settings=settings or fast_settings(), standalone=True, **kwargs)
    options |= dict(namespaces=namespaces, clusterwide=clusterwide, indexers=run.indexers)
    options |= dict(stop_flag=run.stop_flag, ready_flag=ready)
    run.thread = threading.Thread(target=run._main, args=(options,), name="kopf", daemon=True)
    run.thread.start()
    try:
        deadline = asyncio.get_running_loop().time() + startup_timeout
        while not ready.is_set() and run.thread.is_alive():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"The operator did not start in {startup_timeout}s")
            await asyncio.sleep(0.01)
        if not ready.is_set():
            raise RuntimeError("The operator exited at startup") from run.failure
        yield run
    finally:
        run.stop_flag.set()
        await asyncio.to_thread(run.thread.join, 15)
    if run.thread.is_alive():
        raise RuntimeError("The operator did not stop within 15 s")
    if run.failure is not None:
        raise run.failure
