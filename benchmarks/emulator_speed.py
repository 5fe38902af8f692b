"""How fast the emulator answers signed 100-task pages over one keep-alive connection.

Usage::

    .venv/bin/python benchmarks/emulator_speed.py [--pages 200]

Why it is measured: Python's ``http.server`` writes headers and body in separate sends, and a
keep-alive client's delayed ACK then holds every page about 44 ms (about 23 pages/s); the emulator's
handler disables Nagle's algorithm to avoid that. A figure far above 23 pages/s shows the stall is
gone. Prints a line per figure and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipelines"))

from opensearch_tasks.emulator import Emulator, WorldSpec, sign_acs3

AK, SECRET = "speed-ak", "speed-secret"
TARGET_PAGES_PER_S = 150.0  # the stall would hold it near 23


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=200)
    args = parser.parse_args(argv)
    with Emulator(WorldSpec(app_groups=1, tasks_per_instance=3000), keys={AK: SECRET}) as emu:
        app, fn, inst = emu.targets()[0]
        from opensearch_tasks.client import tasks_path

        path = tasks_path(app, fn, inst)
        session = requests.Session()
        session.trust_env = False

        def get(page: int) -> None:
            query = {"pageSize": "100", "pageNumber": str(page)}
            headers = sign_acs3("GET", path, query, emu.endpoint, AK, SECRET)
            response = session.get(f"{emu.url}{path}?{urlencode(query)}", headers=headers, timeout=5)
            if response.status_code != 200 or len(response.content) < 20_000:
                raise SystemExit(
                    f"unexpected answer: HTTP {response.status_code}, {len(response.content)} bytes"
                )

        for page in range(1, 21):  # warm: every page rendered once
            get(page)
        started = time.perf_counter()
        for k in range(args.pages):
            get(1 + k % 20)
        rate = args.pages / (time.perf_counter() - started)
    met = rate >= TARGET_PAGES_PER_S
    print(
        f"signed 100-task pages/s, one keep-alive client in the same process: {rate:.0f} (target >= 150)"
    )
    print(json.dumps({"pages_per_s": round(rate, 1), "target": TARGET_PAGES_PER_S, "met": met}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
