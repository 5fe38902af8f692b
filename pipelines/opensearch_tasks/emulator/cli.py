"""Command line: run the emulator until SIGINT/SIGTERM.

Usage::

    opensearch-tasks emulator --port 0 --access-key-id test-ak --access-key-secret test-secret
    python -m opensearch_tasks.emulator --port 8765 --seed 7 --latency-ms 20

The first line on stdout is ``emulator listening on http://127.0.0.1:PORT`` (flushed), so a parent
process can read the address. Credentials fall back to the standard ``ALIBABA_CLOUD_*`` variables,
which keeps the secret out of the process list.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .emulator import Emulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the emulator's options on ``parser``."""
    env = os.environ.get
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--access-key-id",
        default=env("ALIBABA_CLOUD_ACCESS_KEY_ID", "test-ak"),
        help="AccessKey id to accept (default $ALIBABA_CLOUD_ACCESS_KEY_ID or test-ak)",
    )
    parser.add_argument(
        "--access-key-secret",
        default=env("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
        help="its secret (default $ALIBABA_CLOUD_ACCESS_KEY_SECRET; required one way or the other)",
    )
    parser.add_argument(
        "--security-token",
        default=env("ALIBABA_CLOUD_SECURITY_TOKEN"),
        help="make the key an STS key that must send this token",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--app-groups", type=int, default=3)
    parser.add_argument("--functions-per-group", type=int, default=3)
    parser.add_argument("--instances-per-function", type=int, default=2)
    parser.add_argument("--tasks-per-instance", type=int, default=60)
    parser.add_argument("--history-days", type=float, default=28)
    parser.add_argument("--future-days", type=float, default=14)
    parser.add_argument("--start-ms", type=int, default=None, help="initial clock (epoch ms)")
    parser.add_argument(
        "--pascal-case",
        choices=("none", "all"),
        default="none",
        help="answer every instance in PascalCase",
    )
    parser.add_argument(
        "--seconds",
        choices=("none", "all"),
        default="none",
        help="answer every instance in epoch seconds",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--error-5xx-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--truncate-rate", type=float, default=0.0)
    parser.add_argument("--error-in-200-rate", type=float, default=0.0)
    parser.add_argument("--drift-tasks-per-page", type=int, default=0)
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument(
        "--faults-json",
        default=None,
        help="a full FaultPlan as JSON (overrides the individual fault options)",
    )


def build(args: argparse.Namespace) -> Emulator:
    """An (unstarted) emulator from parsed arguments."""
    import orjson

    from .emulator import Emulator
    from .faults import FaultPlan
    from .spec import WorldSpec

    if not args.access_key_secret:
        raise SystemExit("--access-key-secret (or $ALIBABA_CLOUD_ACCESS_KEY_SECRET) is required")
    spec = WorldSpec(
        seed=args.seed,
        app_groups=args.app_groups,
        functions_per_group=args.functions_per_group,
        instances_per_function=args.instances_per_function,
        tasks_per_instance=args.tasks_per_instance,
        history_days=args.history_days,
        future_days=args.future_days,
        start_ms=args.start_ms,
        pascal_case_instances="all" if args.pascal_case == "all" else (),
        seconds_instances="all" if args.seconds == "all" else (),
    )
    if args.faults_json:
        faults = FaultPlan.from_dict(orjson.loads(args.faults_json))
    else:
        faults = FaultPlan(
            seed=args.fault_seed,
            latency_ms=args.latency_ms,
            throttle_rate=args.throttle_rate,
            error_5xx_rate=args.error_5xx_rate,
            drop_rate=args.drop_rate,
            truncate_rate=args.truncate_rate,
            error_in_200_rate=args.error_in_200_rate,
            drift_tasks_per_page=args.drift_tasks_per_page,
        )
    ak, secret = args.access_key_id, args.access_key_secret
    if args.security_token:
        return Emulator(spec, sts={ak: (secret, args.security_token)}, port=args.port, faults=faults)
    return Emulator(spec, keys={ak: secret}, port=args.port, faults=faults)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the first stdout line carries the URL."""
    emulator = build(args)
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        emulator.start()
        print(f"emulator listening on {emulator.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m opensearch_tasks.emulator") -> int:
    """``python -m opensearch_tasks.emulator`` and ``opensearch-tasks emulator``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
