"""The OpenSearch emulator over real HTTP, driven by Alibaba Cloud's own generic client.

Every data request goes through ``alibabacloud_tea_openapi.client.Client.call_api`` (ACS3 or the
legacy ROA signature) unless a test needs to forge or replay a request, which it then builds from
the SDK's own signing helper and sends with ``requests``.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest
import requests
from alibabacloud_tea_openapi.client import Client
from alibabacloud_tea_openapi.exceptions import (
    ClientException,
    ServerException,
    ThrottlingException,
)
from alibabacloud_tea_openapi.utils import Utils
from alibabacloud_tea_openapi.utils_models import Config, OpenApiRequest, Params
from conftest import SMALL_WORLD, TEST_AK, TEST_SECRET
from darabonba.exceptions import UnretryableException
from darabonba.runtime import RuntimeOptions
from opensearch_tasks.emulator import ABSENT, Emulator, FaultPlan, sign_acs3

START_MS = 1_790_000_000_000  # a fixed clock, so expectations do not depend on the hour
DAY_MS = 86_400_000

_clients: dict[tuple[Any, ...], Client] = {}


def tasks_path(app: str, fn: str, inst: str, generation: str | None = None) -> str:
    """The ROA path with each segment percent-encoded, as the generated OpenSearch SDK does."""
    segs = ["v4", "openapi", "app-groups", app, "functions", fn, "instances", inst, "tasks"]
    if generation is not None:
        segs.append(generation)
    return "/" + "/".join(quote(s, safe="~") if i > 2 else s for i, s in enumerate(segs))


def call(
    emu: Emulator,
    path: str,
    query: dict[str, Any] | None = None,
    *,
    ak: str = TEST_AK,
    secret: str = TEST_SECRET,
    token: str | None = None,
    algorithm: str | None = None,
    action: str = "ListFunctionTasks",
    read_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """One signed GET through the official client; the body is parsed from raw bytes."""
    key = (emu.endpoint, ak, secret, token, algorithm, read_timeout_ms)
    client = _clients.get(key)
    if client is None:
        config = Config(
            access_key_id=ak,
            access_key_secret=secret,
            security_token=token,
            endpoint=emu.endpoint,
            protocol="http",
            signature_algorithm=algorithm,
            read_timeout=read_timeout_ms,
        )
        client = _clients[key] = Client(config)
    params = Params(
        action=action,
        version="2017-12-25",
        style="ROA",
        method="GET",
        pathname=path,
        auth_type="AK",
        req_body_type="json",
        body_type="byte",
    )
    query = {k: str(v) for k, v in (query or {}).items()}
    resp = client.call_api(params, OpenApiRequest(query=query), RuntimeOptions())
    return {"status": resp["statusCode"], "raw": resp["body"], "headers": resp["headers"]}


def body_of(resp: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(resp["raw"])


def list_tasks(emu: Emulator, target: tuple[str, str, str], **query: Any) -> dict[str, Any]:
    return body_of(call(emu, tasks_path(*target), query))


def sdk_signed_headers(
    emu: Emulator,
    path: str,
    query: dict[str, str],
    *,
    secret: str = TEST_SECRET,
    date: str | None = None,
) -> dict[str, str]:
    """Headers exactly as ``Client.do_request`` builds and signs them (ACS3), for raw replays."""
    headers = {
        "host": emu.endpoint,
        "x-acs-version": "2017-12-25",
        "x-acs-action": "ListFunctionTasks",
        "user-agent": "test",
        "x-acs-date": date or Utils.get_timestamp(),
        "x-acs-signature-nonce": Utils.get_nonce(),
        "accept": "application/json",
        "x-acs-content-sha256": hashlib.sha256(b"").hexdigest(),
    }
    request = SimpleNamespace(method="GET", pathname=path, query=query, headers=headers)
    headers["Authorization"] = Utils.get_authorization(
        request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"], TEST_AK, secret
    )
    return headers


def newest_first(truth: list[dict[str, Any]], target: tuple[str, str, str]) -> list[dict]:
    rows = [r for r in truth if (r["app_group"], r["function_name"], r["instance_name"]) == target]
    return sorted(rows, key=lambda r: r["start_time_ms"], reverse=True)


@pytest.fixture
def fixed(make_emulator: Any) -> Emulator:
    """The small world on a fixed clock."""
    return make_emulator(start_ms=START_MS)


# -- signatures ------------------------------------------------------------------------------------
def test_acs3_request_is_accepted_and_recorded(emulator: Emulator) -> None:
    target = emulator.targets()[0]
    resp = call(emulator, tasks_path(*target), {"pageSize": 5})
    body = body_of(resp)
    assert resp["status"] == 200
    assert body["status"] == "OK" and body["httpCode"] == 200
    assert body["totalCount"] == len(newest_first(emulator.truth(), target)) > 5
    assert len(body["result"]) == 5
    record = emulator.requests[-1]
    assert (record.auth, record.access_key_id, record.status) == ("ACS3-HMAC-SHA256", TEST_AK, 200)
    assert record.action == "ListFunctionTasks" and record.target == target
    assert record.query == {"pageSize": "5"} and record["raw_path"] == tasks_path(*target)
    assert emulator.request_count == 1


def test_legacy_roa_signature_is_accepted(emulator: Emulator) -> None:
    target = emulator.targets()[1]
    body = body_of(call(emulator, tasks_path(*target), {"pageSize": 2}, algorithm="v2"))
    assert len(body["result"]) == 2
    assert emulator.requests[-1].auth == "ROA-HMAC-SHA1"


def test_sts_token_accepted_wrong_or_missing_token_refused(make_emulator: Any) -> None:
    emu = make_emulator(keys={}, sts={"sts-ak": ("sts-secret", "sts-token")})
    path = tasks_path(*emu.targets()[0])
    ok = call(emu, path, ak="sts-ak", secret="sts-secret", token="sts-token")
    assert len(body_of(ok)["result"]) == 1
    ok_v2 = call(emu, path, ak="sts-ak", secret="sts-secret", token="sts-token", algorithm="v2")
    assert ok_v2["status"] == 200
    for token in ("wrong-token", None):
        with pytest.raises(ClientException) as err:
            call(emu, path, ak="sts-ak", secret="sts-secret", token=token)
        assert err.value.status_code == 400
        assert err.value.code == "InvalidSecurityToken.Mismatch"
        assert "result" not in err.value.data and "Result" not in err.value.data


def test_expired_sts_token_refused(make_emulator: Any) -> None:
    emu = make_emulator(keys={}, sts={"old": ("s", "t", time.time() - 1)})
    with pytest.raises(ClientException) as err:
        call(emu, tasks_path(*emu.targets()[0]), ak="old", secret="s", token="t")
    assert err.value.code == "InvalidSecurityToken.Expired"


@pytest.mark.parametrize("algorithm", [None, "v2"])
def test_wrong_secret_refused_without_data_or_leaks(emulator: Emulator, algorithm: Any) -> None:
    with pytest.raises(ClientException) as err:
        call(emulator, tasks_path(*emulator.targets()[0]), secret="not-the-secret", algorithm=algorithm)
    assert (err.value.status_code, err.value.code) == (400, "SignatureDoesNotMatch")
    assert set(err.value.data) <= {"RequestId", "Code", "Message", "statusCode"}
    assert TEST_SECRET not in str(err.value.data)
    assert emulator.requests[-1].status == 400


def test_unknown_access_key_and_missing_authorization(emulator: Emulator) -> None:
    path = tasks_path(*emulator.targets()[0])
    with pytest.raises(ClientException) as err:
        call(emulator, path, ak="nobody")
    assert (err.value.status_code, err.value.code) == (404, "InvalidAccessKeyId.NotFound")
    raw = requests.get(emulator.url + path, timeout=5)
    assert raw.status_code == 400 and raw.json()["Code"] == "MissingAuthorization"


def test_tampered_replayed_and_stale_requests_refused(emulator: Emulator) -> None:
    path = tasks_path(*emulator.targets()[0])
    query = {"pageSize": "1"}
    headers = sdk_signed_headers(emulator, path, query)
    genuine = requests.get(f"{emulator.url}{path}?{urlencode(query)}", headers=headers, timeout=5)
    assert genuine.status_code == 200 and len(genuine.json()["result"]) == 1

    fresh = sdk_signed_headers(emulator, path, query)  # new nonce, then the query changes
    tampered = requests.get(f"{emulator.url}{path}?pageSize=100", headers=fresh, timeout=5)
    assert tampered.status_code == 400
    assert tampered.json()["Code"] == "SignatureDoesNotMatch"
    assert b"result" not in tampered.content.lower()
    assert fresh["Authorization"].rsplit("=", 1)[1] not in tampered.text

    replay = requests.get(f"{emulator.url}{path}?{urlencode(query)}", headers=headers, timeout=5)
    assert replay.status_code == 400 and replay.json()["Code"] == "SignatureNonceUsed"

    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    stale = sdk_signed_headers(emulator, path, query, date=old)
    late = requests.get(f"{emulator.url}{path}?{urlencode(query)}", headers=stale, timeout=5)
    assert late.status_code == 400 and late.json()["Code"] == "InvalidTimeStamp.Expired"


def test_signing_the_decoded_path_is_refused(emulator: Emulator) -> None:
    """The signed path is the one on the wire: a client must encode segments before signing."""
    emulator.add_instance("shop_search", "ctr", "with space", tasks=3)
    with pytest.raises(ClientException) as err:
        call(emulator, "/v4/openapi/app-groups/shop_search/functions/ctr/instances/with space/tasks")
    assert err.value.code == "SignatureDoesNotMatch"
    ok = call(emulator, tasks_path("shop_search", "ctr", "with space"))
    assert ok["status"] == 200


# -- the task list ---------------------------------------------------------------------------------
def test_paging_is_newest_first_with_default_page_size_one(fixed: Emulator) -> None:
    target = fixed.targets()[2]
    expected = newest_first(fixed.truth(), target)
    first = list_tasks(fixed, target)
    assert len(first["result"]) == 1 and first["totalCount"] == len(expected)
    assert first["result"][0]["runId"] == expected[0]["run_id"]
    seen = []
    for page in range(1, 100):
        result = list_tasks(fixed, target, pageSize=7, pageNumber=page)["result"]
        if not result:
            break
        seen.extend(result)
    assert [t["runId"] for t in seen] == [r["run_id"] for r in expected]
    assert [t["startTime"] for t in seen] == sorted((t["startTime"] for t in seen), reverse=True)
    for item, row in zip(seen, expected, strict=True):
        assert item["status"] == row["status"] and item["progress"] == row["progress"]
        assert item["endTime"] == (row["end_time_ms"] or 0)
        assert item.get("extendInfo") == row["extend_info"]
        assert item["generation"] == row["generation"] and item["functionName"] == target[1]
    assert list_tasks(fixed, target, pageSize=7, pageNumber=50)["totalCount"] == len(expected)


def test_start_time_is_strictly_after(fixed: Emulator) -> None:
    target = fixed.targets()[0]
    rows = newest_first(fixed.truth(), target)
    pivot = rows[5]["start_time_ms"]
    after = list_tasks(fixed, target, startTime=pivot, pageSize=100)
    assert after["totalCount"] == 5
    assert [t["runId"] for t in after["result"]] == [r["run_id"] for r in rows[:5]]
    assert list_tasks(fixed, target, startTime=pivot - 1, pageSize=100)["totalCount"] == 6


def test_end_time_filter_and_status_filter(fixed: Emulator) -> None:
    fixed.advance(hours=1)
    target = next(
        t
        for t in fixed.targets()
        if any(r["status"] == "running" for r in newest_first(fixed.truth(), t))
    )
    rows = newest_first(fixed.truth(), target)
    finished = [r for r in rows if r["end_time_ms"] is not None]
    limit = sorted(r["end_time_ms"] for r in finished)[len(finished) // 2]
    body = list_tasks(fixed, target, endTime=limit, pageSize=100)
    assert body["totalCount"] == sum(r["end_time_ms"] < limit for r in finished)
    assert all(0 < t["endTime"] < limit and t["status"] != "running" for t in body["result"])
    for status in ("success", "failed", "running"):
        got = list_tasks(fixed, target, status=status, pageSize=100)
        assert got["totalCount"] == sum(r["status"] == status for r in rows)
        assert {t["status"] for t in got["result"]} <= {status}
    assert list_tasks(fixed, target, status="running", pageSize=100)["totalCount"] >= 1


@pytest.mark.parametrize(
    "query",
    [
        {"pageSize": 0},
        {"pageSize": "abc"},
        {"pageNumber": 0},
        {"status": "done"},
        {"startTime": "yesterday"},
        {"endTime": -1},
    ],
)
def test_bad_parameters_are_invalid_parameter(emulator: Emulator, query: dict[str, Any]) -> None:
    with pytest.raises(ClientException) as err:
        call(emulator, tasks_path(*emulator.targets()[0]), query)
    assert (err.value.status_code, err.value.code) == (400, "InvalidParameter")


def test_unknown_app_instance_and_route(emulator: Emulator) -> None:
    app, fn, inst = emulator.targets()[0]
    with pytest.raises(ClientException) as err:
        call(emulator, tasks_path("no_such_app", fn, inst))
    assert (err.value.status_code, err.value.code) == (404, "App.NotFound")
    with pytest.raises(ClientException) as err:
        call(emulator, tasks_path(app, fn, "no_such_instance"))
    assert (err.value.status_code, err.value.code) == (404, "Instance.NotExist")
    with pytest.raises(ClientException) as err:
        call(emulator, tasks_path(app, "not_a_function", inst))
    assert err.value.code == "Instance.NotExist"
    with pytest.raises(ClientException) as err:
        call(emulator, "/v4/openapi/nothing-here")
    assert (err.value.status_code, err.value.code) == (404, "InvalidAction.NotFound")


def test_get_function_task(fixed: Emulator) -> None:
    target = fixed.targets()[3]
    listed = list_tasks(fixed, target, pageSize=3)["result"][2]
    got = body_of(call(fixed, tasks_path(*target, listed["generation"]), action="GetFunctionTask"))
    assert got["result"] == listed
    with pytest.raises(ClientException) as err:
        call(fixed, tasks_path(*target, "999999"), action="GetFunctionTask")
    assert (err.value.status_code, err.value.code) == (404, "Task.NotExist")


def test_list_app_groups_and_instances(emulator: Emulator) -> None:
    groups = body_of(call(emulator, "/v4/openapi/app-groups", action="ListAppGroups"))
    names = [g["name"] for g in groups["result"]]
    assert groups["totalCount"] == SMALL_WORLD["app_groups"] == len(names)
    app = names[0]
    fn = next(t[1] for t in emulator.targets() if t[0] == app)
    path = f"/v4/openapi/app-groups/{app}/functions/{fn}/instances"
    body = body_of(call(emulator, path, action="ListFunctionInstances"))
    expected = [t[2] for t in emulator.targets() if t[:2] == (app, fn)]
    assert [i["instanceName"] for i in body["result"]] == expected
    assert body["totalCount"] == len(expected)
    item = body["result"][0]
    assert item["functionName"] == fn and item["status"] == "available"
    assert {"functionType", "modelType", "cron", "createTime", "description"} <= set(item)
    query = {"pageSize": 1, "pageNumber": 2}
    one = body_of(call(emulator, path, query, action="ListFunctionInstances"))
    assert [i["instanceName"] for i in one["result"]] == expected[1:2]
    with pytest.raises(ClientException) as err:  # signed as another API than the path names
        call(emulator, path, action="ListFunctionTasks")
    assert (err.value.status_code, err.value.code) == (404, "InvalidAction.NotFound")


# -- casing, units, names --------------------------------------------------------------------------
def test_pascal_case_instance_matches_camel_values(make_emulator: Any) -> None:
    target = ("shop_search", "ctr", "ctr_default")
    camel = make_emulator(start_ms=START_MS, app_groups=1, functions_per_group=8)
    pascal = make_emulator(
        start_ms=START_MS, app_groups=1, functions_per_group=8, pascal_case_instances=[target]
    )
    a = list_tasks(camel, target, pageSize=100)
    b = list_tasks(pascal, target, pageSize=100)
    assert set(b) == {"RequestId", "Status", "HttpCode", "TotalCount", "Result", "Latency"}
    assert b["TotalCount"] == a["totalCount"] and b["Status"] == "OK"
    for ca, pb in zip(a["result"], b["Result"], strict=True):
        assert {k[0].upper() + k[1:]: v for k, v in ca.items()} == pb
    other = list_tasks(pascal, ("shop_search", "ctr", "ctr_v2"))
    assert "result" in other and "Result" not in other
    with pytest.raises(ClientException) as err:
        call(pascal, tasks_path(*target), {"pageSize": "x"})
    assert set(err.value.data) >= {"RequestId", "Code", "Message"}
    assert pascal.truth() == camel.truth()


def test_seconds_instance_answers_and_filters_in_seconds(make_emulator: Any) -> None:
    emu = make_emulator(start_ms=START_MS, seconds_instances="all")
    target = emu.targets()[0]
    rows = newest_first(emu.truth(), target)
    items = list_tasks(emu, target, pageSize=100)["result"]
    assert [t["startTime"] for t in items] == [r["start_time_ms"] // 1000 for r in rows]
    assert all(t["startTime"] < 10**11 for t in items)
    assert all(r["start_time_ms"] % 1000 == 0 for r in rows)  # truth stays exact in ms
    pivot = items[3]["startTime"]
    assert list_tasks(emu, target, startTime=pivot, pageSize=100)["totalCount"] == 3
    assert list_tasks(emu, target, startTime=pivot - 1, pageSize=100)["totalCount"] == 4


def test_percent_encoded_names_are_decoded_and_recorded(emulator: Emulator) -> None:
    name = "a b/..%é"
    emulator.add_instance("shop_search", "ctr", name, tasks=12)
    path = tasks_path("shop_search", "ctr", name)
    assert "a%20b%2F..%25%C3%A9" in path
    body = body_of(call(emulator, path, {"pageSize": 50}))
    truth = newest_first(emulator.truth(), ("shop_search", "ctr", name))
    assert body["totalCount"] == len(truth) > 0
    record = emulator.requests[-1]
    assert record.raw_path == path and record.path[7] == name
    assert record.target == ("shop_search", "ctr", name)
    assert (
        call(
            emulator,
            tasks_path("shop_search", "ctr", name, truth[0]["generation"]),
            action="GetFunctionTask",
        )["status"]
        == 200
    )


# -- the clock, determinism, data ------------------------------------------------------------------
def test_clock_finishes_running_tasks_and_starts_new_ones(fixed: Emulator) -> None:
    before = {r["run_id"]: r for r in fixed.truth()}
    running = [r for r in before.values() if r["status"] == "running"]
    assert running
    target = fixed.targets()[0]
    count_before = list_tasks(fixed, target)["totalCount"]
    fixed.advance(days=3)
    after = {r["run_id"]: r for r in fixed.truth()}
    assert set(before) < set(after)
    finished = [after[r["run_id"]] for r in running if after[r["run_id"]]["status"] != "running"]
    assert finished
    for row in finished:
        assert row["end_time_ms"] is not None and row["end_time_ms"] <= fixed.now_ms
        assert row["progress"] == 100 or row["status"] == "failed"
    new = [r for k, r in after.items() if k not in before]
    assert all(START_MS < r["start_time_ms"] <= fixed.now_ms for r in new)
    count_after = list_tasks(fixed, target)["totalCount"]
    assert count_after == len(newest_first(list(after.values()), target)) >= count_before


def test_same_seed_same_world_different_seed_different(make_emulator: Any) -> None:
    a = make_emulator(start_ms=START_MS)
    b = make_emulator(start_ms=START_MS)
    c = make_emulator(start_ms=START_MS, seed=8)
    assert a.truth() == b.truth()
    assert a.truth() != c.truth()
    target = a.targets()[0]
    page_a = list_tasks(a, target, pageSize=20)["result"]
    page_b = list_tasks(b, target, pageSize=20)["result"]
    assert page_a == page_b
    a.advance(hours=5)
    b.advance(hours=5)
    assert a.truth() == b.truth()


def test_world_has_realistic_mix_and_edge_cases(make_emulator: Any) -> None:
    emu = make_emulator(
        start_ms=START_MS,
        app_groups=4,
        functions_per_group=4,
        instances_per_function=3,
        tasks_per_instance=500,
    )
    rows = emu.truth()
    statuses = Counter(r["status"] for r in rows)
    assert 0.75 < statuses["success"] / len(rows) < 0.88
    assert 0.11 < statuses["failed"] / len(rows) < 0.20
    running = [r for r in rows if r["status"] == "running"]
    assert any(r["start_time_ms"] < START_MS - 7 * DAY_MS for r in running)  # stuck for a week+
    assert sum(r["start_time_ms"] > START_MS - DAY_MS for r in running) >= 2
    by_instance = Counter((r["app_group"], r["function_name"], r["instance_name"]) for r in rows)
    assert len(
        {(r["app_group"], r["function_name"], r["instance_name"], r["run_id"]) for r in rows}
    ) == len(rows)
    assert len(by_instance) == 48 and {t[1] for t in by_instance} <= {
        "ctr",
        "pop",
        "category",
        "hot",
        "hint",
        "suggest",
        "analyzer",
        "termweight",
    }
    assert all(r["run_id"].split("__")[0] in ("trigger", "cron") for r in rows)
    parsed, malformed, drifted = [], 0, 0
    for r in rows:
        try:
            value = orjson.loads(r["extend_info"]) if r["extend_info"] is not None else None
        except orjson.JSONDecodeError:
            malformed += 1
            continue
        if not isinstance(value, dict):
            malformed += 1
            continue
        parsed.append((r, value))
        metrics = value.get("metrics", value)
        drifted += any(isinstance(v, str) for v in metrics.values())
    assert 0.01 < malformed / len(rows) < 0.035
    assert drifted > 0
    failed = [v for r, v in parsed if r["status"] == "failed"]
    errors = [e for v in failed for e in v["errors"]]
    assert all(v["errors"] for v in failed)
    assert any(isinstance(e, str) for e in errors) and any(isinstance(e, dict) for e in errors)
    assert all(v["errors"] == [] for r, v in parsed if r["status"] == "success")
    assert any("metrics" in v for _, v in parsed) and any("auc" in v for _, v in parsed)


def test_generations_increase_with_start_time(fixed: Emulator) -> None:
    for target in fixed.targets():
        rows = newest_first(fixed.truth(), target)[::-1]
        assert [int(r["generation"]) for r in rows] == list(range(1, len(rows) + 1))


def test_injected_tasks_serve_raw_extend_info(emulator: Emulator) -> None:
    target = emulator.targets()[0]
    now = emulator.now_ms
    cases = ['{"recall":', "", "null", "[1,2]", '{"recall":"91%"}', None, ABSENT]
    for k, raw in enumerate(cases):
        emulator.add_task(*target, status="failed", start_ms=now - 1000 + k, end_ms=now, extend_info=raw)
    items = list_tasks(emulator, target, pageSize=len(cases))["result"][::-1]
    for raw, item in zip(cases, items, strict=True):
        if raw is ABSENT:
            assert "extendInfo" not in item
        else:
            assert item["extendInfo"] == raw
    assert len({i["runId"] for i in items}) == len(items)  # same second: suffixed run ids
    stuck = emulator.add_task(*target, status="running", start_ms=now - 10 * DAY_MS)
    emulator.advance(days=30)
    row = next(r for r in emulator.truth() if r["run_id"] == stuck["run_id"])
    assert row["status"] == "running" and row["end_time_ms"] is None


def test_fast_serialisation_matches_the_generic_path(make_emulator: Any) -> None:
    emu = make_emulator(
        start_ms=START_MS,
        tasks_per_instance=400,
        seconds_instances=[("shop_search", "category", "category_default")],
        pascal_case_instances=[("shop_search", "category", "category_v2")],
    )
    now, checked = emu.now_ms, 0
    for inst in emu.world.instances.values():
        for i in inst.visible(now):
            if inst.ends[i] <= now:
                assert inst._fast_item(i, inst.ends[i], inst.keys[i]) == inst._generic_item(i, now)
                checked += 1
    assert checked > 2000


# -- faults ----------------------------------------------------------------------------------------
def test_throttling_surfaces_as_throttling_exception(emulator: Emulator) -> None:
    path = tasks_path(*emulator.targets()[0])
    emulator.set_faults(FaultPlan(fail_first_n=2, fail_first_kind="throttle", retry_after_ms=80))
    for _ in range(2):
        with pytest.raises(ThrottlingException) as err:
            call(emulator, path)
        assert (err.value.status_code, err.value.code, err.value.retry_after) == (
            400,
            "Throttling.User",
            80,
        )
    assert call(emulator, path)["status"] == 200
    emulator.set_faults(FaultPlan(script=("throttle",), throttle_status=429, retry_after_ms=1500))
    headers = sdk_signed_headers(emulator, path, {})
    raw = requests.get(emulator.url + path, headers=headers, timeout=5)
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "2"
    assert raw.headers["x-acs-retry-after"] == "1500"
    assert emulator.faults_injected == {"throttle": 1}


@pytest.mark.parametrize(("status", "code"), [(503, "ServiceUnavailable"), (500, "InternalError")])
def test_server_errors(emulator: Emulator, status: int, code: str) -> None:
    emulator.set_faults(FaultPlan(error_5xx_rate=1.0, error_5xx_status=status))
    with pytest.raises(ServerException) as err:
        call(emulator, tasks_path(*emulator.targets()[0]))
    assert (err.value.status_code, err.value.code) == (status, code)


def test_drop_truncate_and_error_in_200(emulator: Emulator) -> None:
    path = tasks_path(*emulator.targets()[0])
    emulator.set_faults(FaultPlan(script=("drop", "truncate", "error_in_200", "ok")))
    with pytest.raises(UnretryableException):
        call(emulator, path, {"pageSize": 10})
    truncated = call(emulator, path, {"pageSize": 10})
    assert truncated["status"] == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(truncated["raw"])
    lying = body_of(call(emulator, path, {"pageSize": 10}))
    assert lying["code"] == "Task.IsRunning" and "result" not in lying
    assert len(body_of(call(emulator, path, {"pageSize": 10}))["result"]) == 10
    assert [r.fault for r in emulator.requests] == ["drop", "truncate", "error_in_200", None]
    emulator.set_faults(FaultPlan(script=("truncate",), truncate_mode="connection"))
    with pytest.raises(UnretryableException):
        call(emulator, path, {"pageSize": 10})


def test_stall_blocks_only_its_own_connection(emulator: Emulator) -> None:
    path = tasks_path(*emulator.targets()[0])
    emulator.set_faults(FaultPlan(script=("stall",), stall_seconds=2.0))
    with pytest.raises(requests.Timeout):
        requests.get(emulator.url + path, headers=sdk_signed_headers(emulator, path, {}), timeout=0.3)
    ok = requests.get(emulator.url + path, headers=sdk_signed_headers(emulator, path, {}), timeout=2)
    assert ok.status_code == 200
    # answered while the stalled request still waits: its record is not there yet
    assert [record.fault for record in emulator.requests][-1:] == [None]
    assert "stall" not in {record.fault for record in emulator.requests}


def test_latency_does_not_serialise_concurrent_clients(make_emulator: Any) -> None:
    emu = make_emulator(faults=FaultPlan(latency_ms=50))
    path = tasks_path(*emu.targets()[0])
    statuses: list[int] = []

    def client() -> None:
        session = requests.Session()
        for _ in range(5):
            headers = sign_acs3("GET", path, {}, emu.endpoint, TEST_AK, TEST_SECRET)
            statuses.append(session.get(emu.url + path, headers=headers, timeout=5).status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 40
    # Answered one after another, every two answers would be at least 50 ms apart.
    answered = sorted(record.wall_time for record in emu.requests)
    gaps = [later - earlier for earlier, later in itertools.pairwise(answered)]
    assert min(gaps) < 0.025, f"answers never overlapped: smallest gap {min(gaps) * 1000:.0f} ms"


def test_faults_are_deterministic_and_scoped(make_emulator: Any) -> None:
    plan = FaultPlan(
        seed=3,
        throttle_rate=0.3,
        error_5xx_rate=0.2,
        only_instances=[("shop_search", "ctr", "ctr_default")],
    )
    runs = []
    for _ in range(2):
        emu = make_emulator(faults=plan, app_groups=1, functions_per_group=8)
        path = tasks_path("shop_search", "ctr", "ctr_default")
        outcome = []
        for _ in range(30):
            headers = sign_acs3("GET", path, {}, emu.endpoint, TEST_AK, TEST_SECRET)
            outcome.append(requests.get(emu.url + path, headers=headers, timeout=5).status_code)
        runs.append(outcome)
        other = tasks_path("shop_search", "ctr", "ctr_v2")
        assert all(call(emu, other)["status"] == 200 for _ in range(10))
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 400, 503}


def test_drift_shifts_pages_and_grows_truth(fixed: Emulator) -> None:
    target = fixed.targets()[0]
    before = newest_first(fixed.truth(), target)
    clock = fixed.now_ms
    fixed.set_faults(FaultPlan(drift_tasks_per_page=2, only_actions=("ListFunctionTasks",)))
    page1 = list_tasks(fixed, target, pageSize=5, pageNumber=1)["result"]
    page2 = list_tasks(fixed, target, pageSize=5, pageNumber=2)["result"]
    assert [t["runId"] for t in page1] == [r["run_id"] for r in before[:5]]
    # two tasks started at the top after page 1: page 2 repeats page 1's last two tasks
    assert [t["runId"] for t in page2] == [r["run_id"] for r in before[3:8]]
    after = newest_first(fixed.truth(), target)
    assert len(after) == len(before) + 4
    assert all(r["status"] == "running" for r in after[:4])
    assert clock < after[0]["start_time_ms"] <= fixed.now_ms <= clock + 10


# -- control endpoints, CLI, transport -------------------------------------------------------------
def test_control_endpoints(fixed: Emulator) -> None:
    base = fixed.url + "/_emulator"
    assert requests.get(base + "/clock", timeout=5).json()["now_ms"] == START_MS
    moved = requests.post(base + "/clock", json={"advance_ms": 60_000}, timeout=5).json()
    assert moved["now_ms"] == fixed.now_ms == START_MS + 60_000
    truth = requests.get(base + "/truth", timeout=5).json()
    assert truth == fixed.truth()
    plan = {"throttle_rate": 1.0, "only_actions": ["ListFunctionTasks"]}
    assert requests.post(base + "/faults", json=plan, timeout=5).status_code == 200
    assert fixed.faults.throttle_rate == 1.0
    assert requests.post(base + "/faults", json={"bogus": 1}, timeout=5).status_code == 400
    with pytest.raises(ThrottlingException):
        call(fixed, tasks_path(*fixed.targets()[0]))
    stats = requests.get(base + "/stats", timeout=5).json()
    assert stats["request_count"] == 1 and stats["faults_injected"] == {"throttle": 1}
    assert requests.delete(base + "/faults", timeout=5).json()["plan"]["throttle_rate"] == 0
    added = requests.post(
        base + "/tasks",
        timeout=5,
        json={
            "app_group": fixed.targets()[0][0],
            "function_name": fixed.targets()[0][1],
            "instance_name": fixed.targets()[0][2],
            "status": "failed",
            "extend_info": "{x",
            "start_ms": fixed.now_ms - 60_000,
            "end_ms": fixed.now_ms - 1,
        },
    )
    assert added.json()["extend_info"] == "{x" and added.json()["status"] == "failed"


def test_render_builds_every_finished_task_and_serves_the_same_pages(make_emulator: Any) -> None:
    """``POST /_emulator/render`` (the benchmarks call it before a measured run) builds the JSON of
    every finished task up front; a client reads exactly what a lazily rendering twin serves."""
    lazy, rendered = make_emulator(start_ms=START_MS), make_emulator(start_ms=START_MS)
    reply = requests.post(rendered.url + "/_emulator/render", timeout=30).json()
    assert reply == {"rendered": len(rendered.truth())}
    assert reply["rendered"] > 0
    for inst in rendered.world.instances.values():  # finished tasks are cached, none was built lazily
        now = rendered.now_ms
        finished = [i for i in inst.visible(now) if inst.ends[i] <= now]
        assert finished
        assert all(inst.cache[i] is not None for i in finished)
    for target in lazy.targets():
        for page in range(1, 4):
            pages = [list_tasks(e, target, pageSize=7, pageNumber=page) for e in (lazy, rendered)]
            assert pages[0]["result"] == pages[1]["result"]
            assert pages[0]["totalCount"] == pages[1]["totalCount"]


def test_cli_prints_url_first_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opensearch_tasks.emulator",
            "--port",
            "0",
            "--access-key-id",
            TEST_AK,
            "--access-key-secret",
            TEST_SECRET,
            "--seed",
            "3",
            "--tasks-per-instance",
            "10",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert requests.get(url + "/_emulator/health", timeout=5).json() == {"ok": True}
        targets = requests.get(url + "/_emulator/targets", timeout=5).json()
        assert len(targets) == 18
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_stop_closes_keep_alive_connections(make_emulator: Any) -> None:
    emu = make_emulator()
    session = requests.Session()
    assert session.get(emu.url + "/_emulator/health", timeout=5).status_code == 200
    emu.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(emu.url + "/_emulator/health", timeout=2)
