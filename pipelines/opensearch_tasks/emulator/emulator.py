"""``Emulator``: the world plus a real HTTP server in a background thread.

Usage::

    with Emulator(WorldSpec(seed=7), keys={"test-ak": "test-secret"}) as emu:
        emu.url, emu.endpoint, emu.truth(), emu.advance(hours=2)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .faults import FaultPlan
from .instance import GENERATE
from .server import App, HTTPServer, RequestRecord
from .signing import Credential, Verifier
from .spec import DAY_MS, HOUR_MS, Target, WorldSpec
from .world import World

StsValue = tuple[str, str] | tuple[str, str, float]


class Emulator:
    """A local OpenSearch function-task API: deterministic data, signed access, faults, a clock.

    ``keys`` maps AccessKey id -> secret; ``sts`` maps STS AccessKey id -> (secret, token) or
    (secret, token, expires_at wall-clock epoch seconds). ``verify_signatures=False`` skips
    authentication entirely (only for measuring the emulator itself). ``cache_json=False`` trades
    speed for memory: finished tasks' JSON is not kept but rebuilt on every read.
    """

    def __init__(
        self,
        spec: WorldSpec | None = None,
        keys: Mapping[str, str] | None = None,
        sts: Mapping[str, StsValue] | None = None,
        port: int = 0,
        *,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        verify_signatures: bool = True,
        max_records: int = 200_000,
        cache_json: bool = True,
    ) -> None:
        self.spec = spec or WorldSpec()
        self.world = World(self.spec, cache_json=cache_json)
        creds = {ak: Credential(secret) for ak, secret in (keys or {}).items()}
        for ak, value in (sts or {}).items():
            secret, token, *rest = value
            creds[ak] = Credential(secret, token, float(rest[0]) if rest else None)
        verifier = Verifier(creds) if verify_signatures else None
        self.app = App(self.world, verifier, max_records)
        if faults is not None:
            self.app.set_faults(faults)
        self._host = host
        self._port = port
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Emulator:
        """Bind and serve in a daemon thread (port 0 picks a free port)."""
        if self._server is not None:
            return self
        self.app.stop_event.clear()
        self._server = HTTPServer((self._host, self._port), self.app)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"opensearch-emulator:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled handlers and cut open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        self.app.stop_event.set()
        server.shutdown()
        server.server_close()
        server.close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, as the SDK's ``Config(endpoint=...)`` wants it."""
        return f"{self._host}:{self._port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.endpoint}"

    # -- clock and data -------------------------------------------------------------------------
    @property
    def now_ms(self) -> int:
        """The emulated clock (epoch ms)."""
        return self.world.now_ms

    @property
    def start_ms(self) -> int:
        """The clock's initial value."""
        return self.world.start_ms

    def advance(self, ms: int = 0, *, seconds: float = 0, hours: float = 0, days: float = 0) -> int:
        """Move the clock forward: running tasks progress or finish, new tasks start."""
        step = int(ms) + int(seconds * 1000) + int(hours * HOUR_MS) + int(days * DAY_MS)
        with self.world.lock:
            return self.world.advance(step)

    def set_now(self, now_ms: int) -> int:
        """Set the clock (rewinding is allowed; finished tasks may then run again)."""
        with self.world.lock:
            return self.world.set_now(now_ms)

    def truth(self) -> list[dict[str, Any]]:
        """Current state of every task visible now (times in ms, whatever the wire unit)."""
        with self.world.lock:
            return self.world.truth()

    def targets(self) -> list[Target]:
        """Every (app_group, function_name, instance_name)."""
        with self.world.lock:
            return list(self.world.instances)

    def add_instance(
        self,
        app_group: str,
        function_name: str,
        instance_name: str,
        *,
        tasks: int = 10,
        style: str = "camel",
        time_unit: str = "ms",
    ) -> Target:
        """Add an instance with any name (spaces, '/', '..', '%', non-ASCII...)."""
        target = (app_group, function_name, instance_name)
        with self.world.lock:
            self.world.add_instance(target, tasks=tasks, style=style, time_unit=time_unit)
        return target

    def add_task(
        self,
        app_group: str,
        function_name: str,
        instance_name: str,
        *,
        status: str = "success",
        start_ms: int | None = None,
        end_ms: int | None = None,
        extend_info: object = GENERATE,
        run_id: str | None = None,
        generation: str | None = None,
    ) -> dict[str, Any]:
        """Inject a task; see ``World.add_task``. Returns its truth row."""
        with self.world.lock:
            return self.world.add_task(
                (app_group, function_name, instance_name),
                status=status,
                start_ms=start_ms,
                end_ms=end_ms,
                extend_info=extend_info,
                run_id=run_id,
                generation=generation,
            )

    # -- faults and observation -----------------------------------------------------------------
    @property
    def faults(self) -> FaultPlan:
        """The live fault plan."""
        return self.app.faults.plan

    def set_faults(self, plan: FaultPlan | None = None, **fields: Any) -> FaultPlan:
        """Replace the plan (``set_faults(FaultPlan(...))`` or ``set_faults(throttle_rate=.1)``)."""
        plan = plan if plan is not None else FaultPlan(**fields)
        self.app.set_faults(plan)
        return plan

    def cap_page_size(self, size: int | None) -> None:
        """Silently cap ``pageSize`` of ListFunctionTasks at ``size`` (None: no cap), like some servers."""
        self.app.service.max_page_size = size

    def cap_instances_page_size(self, size: int | None) -> None:
        """Silently cap ``pageSize`` of ListFunctionInstances at ``size`` (None: no cap)."""
        self.app.service.max_instances_page_size = size

    def clear_faults(self) -> None:
        """No faults from now on."""
        self.app.set_faults(FaultPlan())

    @property
    def faults_injected(self) -> dict[str, int]:
        """How many faults of each kind the current plan has injected."""
        return dict(self.app.faults.injected)

    @property
    def requests(self) -> list[RequestRecord]:
        """Data requests received (oldest first; control endpoints excluded)."""
        return list(self.app.records)

    @property
    def request_count(self) -> int:
        """Number of data requests received (control endpoints excluded)."""
        return self.app.request_count

    def reset_requests(self) -> None:
        """Forget recorded requests and reset the count."""
        self.app.records.clear()
        self.app.request_count = 0
