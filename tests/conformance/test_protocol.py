"""The Node.js gateway speaks the Python gateway's protocol byte for byte: the same probes,
sent to one of each, get the same statuses, bodies, frames and close codes. And the Node SDK
runs the engine's own scripts, knows its settings, and measures messages as Python does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import struct
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from metering.core.settings import Settings
from metering.gateway.server import _parse, encode
from metering.live.store import DEREGISTER, EVIDENCE, FLUSH, PREPARE, READ
from metering.rollups.models import FRONTEND_COUNTERS
from tests import processes
from tests.conformance.conftest import (
    NODE_SDK,
    ROOT,
    Engine,
    Gateway,
    node_available,
    publish_registry,
)
from tests.conftest import Env
from tests.factories import tenant

Start = Callable[..., list[Gateway]]

FRAMES = [
    '{"action":"attach","channel":"c"}',
    '{"action":"publish","channel":"c","data":[1.0,1e16,1.5e16,1e-5,1e-4,-0.0,-0,'
    "12345678901234567890,1e400,-1e400,0.1,123.456e5,5e-324,1.7976931348623157e308,1E2,2.5e-7]}",
    '{"action":"publish","channel":"c","data":{"b":1,"2":0,"1":0,"a":{"x":1,"x":2}}}',
    '{"action":"publish","channel":"c","data":"\\u0000\\u001f\\u007f\\u2028\\"\\\\/\\b\\f\\n\\r\\t'
    '\\ud83d\\ude00 h\u00e9llo"}',
    '{"action":"publish","channel":"c","data":true,"data":null}',
    '{"action":"publish","channel":"c\\u00e9","data":1}',
    '{"action":"publish","channel":"c"}',
    '{"action":"publish","data":1}',
    '{"action":"publish","channel":"c","data":{"\\ud800":1}}',
    '{"action":"publish","channel":"c","data":"' + "x" * 65534 + '"}',
    '{"action":"publish","channel":"c","data":"' + "x" * 65535 + '"}',
    '{"action":"publish","channel":"c","data":' + "1" * 4300 + "}",
    '{"action":"publish","channel":"c","data":' + "1" * 4301 + "}",
    '{"action":"publish","channel":"c","data":' + "[" * 500 + "]" * 500 + "}",
    '{"action":"publish","channel":"c","data":' + "[" * 5000 + "]" * 5000 + "}",
    '{"action":5}', '{"action":null}', '{"action":["x"]}', '{"action":{"a":1.0}}',
    '{"action":"' + "\u00e9" * 100 + '"}', '{"action":"dance"}', '{"no":"action"}',
    '{"action":"attach"}', '{"action":"attach","channel":""}', '{"action":"attach","channel":7}',
    '{"action":"attach","channel":"' + "x" * 256 + '"}',
    '{"action":"attach","channel":"' + "x" * 257 + '"}',
    '{"action":"attach","channel":"' + "\U0001f600" * 256 + '"}',
    '{"action":"attach","channel":"new\\nline"}', '{"action":"attach","channel":"a\\u007f"}',
    '{"action":"attach","channel":"a\\u009f"}', '{"action":"attach","channel":"a\\u00a0"}',
    '{"action":"attach","channel":"\\ud800"}', '{"action":"attach","channel":"a|b"}',
    '{"action":"detach","channel":"zz"}', '{"action":"detach","channel":""}',
    ' {"action":"detach","channel":"c"} ', "\ufeff{}", '{"a":1}x', "1", "null", '"x"', "[]",
    '["a list"]', "{not json", '{"n": NaN}', '{"n": Infinity}',
    '{"n":01}', '{"n":1.}', '{"n":.5}', '{"n":"\\x"}', '{"n":"a\tb"}', "",
]  # fmt: skip

UPGRADES = ["app=APP", "app=999999", "app=not-a-number", "app=" + "1" * 21, "", "app=",
            "app=APP&app=999", "app=999&app=APP", "app=%41PP"]  # fmt: skip

REQUESTS = [
    ("GET", "/healthz", None), ("POST", "/healthz", None), ("GET", "/nope", None),
    ("GET", "/healthz/", None), ("GET", "/v1/realtime?app=APP", None),
    ("GET", "/v1/apps/APP/messages", None), ("POST", "/v1/apps/APP/messages/", b"{}"),
    ("POST", "/v1/apps/APP/messages", b'{"channel":"c","data":1.0}'),
    ("POST", "/v1/apps/APP/messages", b'[{"channel":"c","data":1},{"channel":"d","data":[1e16]}]'),
    ("POST", "/v1/apps/APP/messages", '{"channel":"c","data":"\u00e9"}'.encode("utf-16")),
    ("POST", "/v1/apps/APP/messages", '{"channel":"c","data":"\u00e9"}'.encode("utf-16-le")),
    ("POST", "/v1/apps/APP/messages", '{"channel":"c","data":"\u00e9"}'.encode("utf-32")),
    ("POST", "/v1/apps/APP/messages", b'\xef\xbb\xbf{"channel":"c","data":1}'),
    ("POST", "/v1/apps/APP/messages", b'{"channel":"c","data":"\xff"}'),
    ("POST", "/v1/apps/APP/messages", b""), ("POST", "/v1/apps/APP/messages", b"{oops"),
    ("POST", "/v1/apps/APP/messages", b"[]"),
    ("POST", "/v1/apps/APP/messages", b'{"channel": "c"}'),
    ("POST", "/v1/apps/APP/messages", json.dumps([{"channel": "c", "data": 1}] * 101).encode()),
    ("POST", "/v1/apps/APP/messages", b'[{"channel": "c", "data": 1}, {"channel": 5, "data": 1}]'),
    ("POST", "/v1/apps/APP/messages", json.dumps({"channel": "c", "data": "x" * 70_000}).encode()),
    ("POST", "/v1/apps/APP/messages", b"x" * 14_000_000),
    ("POST", "/v1/apps/%41PP/messages", b'{"channel":"c","data":1}'),
    ("POST", "/v1/apps/424242/messages", b'{"channel":"c","data":1}'),
    ("GET", "/v1/stream", None), ("GET", "/v1/stream?app=999", None),
    ("GET", "/v1/stream?channel=c", None), ("GET", "/v1/stream?app=APP&channel=", None),
    ("GET", "/v1/stream?app=APP&channel=a%00", None),
    ("GET", "/v1/stream?app=APP&" + "&".join(f"channel=c{i}" for i in range(201)), None),
]  # fmt: skip


def _normal(text: str) -> str:
    """A frame with its random connection id replaced by the id's length."""
    if '"connectionId"' not in text:
        return text
    return json.dumps({**json.loads(text), "connectionId": len(json.loads(text)["connectionId"])})


async def _ws_probes(port: int, app: str) -> list[Any]:
    out: list[Any] = []
    for query in UPGRADES:
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?{query.replace('APP', app)}")
        except InvalidStatus as exc:
            r = exc.response
            out.append((query, r.status_code, r.headers.get("content-type"), bytes(r.body or b"")))
            continue
        out.append((query, "open", _normal(await ws.recv())))
        await ws.close()
    try:
        await connect(f"ws://127.0.0.1:{port}/elsewhere?app={app}")
    except InvalidStatus as exc:
        out.append(("elsewhere", exc.response.status_code, bytes(exc.response.body or b"")))

    ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?app={app}")
    out.append(_normal(await ws.recv()))
    for frame in FRAMES:
        await ws.send(frame)
        reply = await ws.recv()
        # A publish on an attached channel: the message first, then the ack.
        got = [reply, await ws.recv()] if reply.startswith('{"action":"message"') else [reply]
        out.append((frame[:60], got))
    await ws.send(b"\x00binary")
    out.append(await ws.recv())
    await ws.send('{"action":"publish","channel":"c","data":"' + "x" * 200_000 + '"}')
    with pytest.raises(ConnectionClosed) as closed:
        await ws.recv()
    out.append(("oversized frame", closed.value.rcvd.code if closed.value.rcvd else None))
    return out


def _http_probes(base: str, app: str) -> list[Any]:
    out = []
    with httpx.Client(timeout=10) as http:
        for method, path, content in REQUESTS:
            r = http.request(method, base + path.replace("APP", app), content=content)
            location = r.headers.get("location", "").replace(base, "BASE")
            # Each gateway's own id and incarnation, in the shape they must have.
            body = re.sub(rb'"gw-\d(#\d{10}-[0-9a-f]{8})?"', b'"ID"', r.content)
            out.append(
                (method, path[:60], r.status_code, r.headers.get("content-type"), location, body)
            )
        url = f"{base}/v1/stream?app={app}&channel=a&channel=b&channel=a"
        with http.stream("GET", url) as stream:
            lines = stream.iter_lines()
            head = [next(lines), _normal(next(lines).removeprefix("data: ")), next(lines)]
            headers = [stream.headers.get(h) for h in ("content-type", "cache-control")]
            out.append(
                (stream.status_code, *headers, stream.headers.get("x-accel-buffering"), head)
            )
    return out


def test_node_answers_every_probe_as_python_does(
    env: Env, start_gateways: Start, engine: Engine
) -> None:
    t = tenant("platform")
    publish_registry(env)
    python, node = start_gateways(["python", "node"])
    app = str(t.app_id)
    answers = {}
    for gw in (python, node):
        answers[gw.kind] = (asyncio.run(_ws_probes(gw.port, app)), _http_probes(gw.http, app))
    for (py, nd) in zip(answers["python"][0] + answers["python"][1],
                        answers["node"][0] + answers["node"][1], strict=True):  # fmt: skip
        assert nd == py


@pytest.mark.parametrize("driver", ["python", "node"])
def test_bad_input_gets_a_clear_error_and_counts_nothing(
    driver: str, env: Env, start_gateways: Start, engine: Engine
) -> None:
    t = tenant("platform")
    publish_registry(env)
    (gw,) = start_gateways([driver])

    async def scenario() -> None:
        for app, status, code in (
            ("999999", 404, 40400),
            ("not-a-number", 404, 40400),
            ("", 400, 40000),
        ):
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{gw.port}/v1/realtime?app={app}")
            assert refused.value.response.status_code == status
            assert json.loads(bytes(refused.value.response.body or b""))["error"]["code"] == code
        ws = await connect(f"ws://127.0.0.1:{gw.port}/v1/realtime?app={t.app_id}")
        await ws.recv()
        for frame, code in [
            ("{not json", 40000),
            ('["a list"]', 40000),
            ('{"action": "dance"}', 40000),
            ('{"action": "attach"}', 40010),
            (json.dumps({"action": "publish", "channel": "c", "data": "x" * 70_000}), 40009),
        ]:
            await ws.send(frame)
            reply = json.loads(await ws.recv())
            assert (reply["action"], reply["error"]["code"]) == ("error", code), frame
            assert reply["error"]["message"]
        await ws.send('{"action":"attach","channel":"c"}')
        assert json.loads(await ws.recv()) == {"action": "attached", "channel": "c"}
        # A frame over the hard cap ends the connection (1009), counted closed once.
        await ws.send(json.dumps({"action": "publish", "channel": "c", "data": "x" * 200_000}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009

    asyncio.run(scenario())
    rest = httpx.post(f"{gw.http}/v1/apps/424242/messages", json={"channel": "c", "data": 1})
    assert (rest.status_code, rest.json()["error"]["code"]) == (404, 40400)
    inc = httpx.get(f"{gw.http}/healthz").json()["incarnation"]
    engine.values_after_tick(lambda: engine.app(t.app_id).connections == 0, "closed")
    gw.proc.stop()
    packed = engine.store().client.hget(engine.store().key(f"fe:{inc}:counters"), str(t.app_id))
    counters = dict(zip(FRONTEND_COUNTERS, map(int, packed.split()), strict=True))
    assert (counters["opened"], counters["pub_n"], counters["refused"]) == (1, 0, 0)


def test_a_datacenter_the_engine_does_not_read_stops_either_gateway_with_one_line(
    env: Env,
) -> None:
    child = env.child_env(METERING_DATACENTERS=f"eu={env.vars['METERING_REDIS_URL']}")
    results = {}
    for kind in ("python", "node"):
        args = (
            [str(processes.BIN / "metering"), "gateway"]
            if kind == "python"
            else [node_available(), str(NODE_SDK / "examples" / "gateway.js")]
        )
        done = subprocess.run(
            [*args, "--datacenter", "us", "--frontend-id", "gw-x"],
            env=child, capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
        )  # fmt: skip
        results[kind] = (done.returncode, done.stderr.strip(), done.stdout)
    assert results["node"] == results["python"]
    code, line, _ = results["node"]
    assert code == 1
    assert line == (
        "error: datacenter 'us' is not one the engine reads (eu); set METERING_DATACENTER, "
        "or list it in METERING_DATACENTERS"
    )


def _node(script: str, stdin: str = "") -> str:
    done = subprocess.run(
        [node_available(), "--input-type=module", "-e", script],
        input=stdin, capture_output=True, text=True, timeout=60, check=True, cwd=NODE_SDK,
    )  # fmt: skip
    return done.stdout


def test_the_node_sdk_knows_every_python_setting() -> None:
    known = json.loads(
        _node("import {KNOWN} from './src/settings.js'; console.log(JSON.stringify(KNOWN))")
    )
    assert sorted(known) == sorted(Settings.model_fields)


def test_the_node_sdk_sends_the_very_scripts_the_python_store_sends() -> None:
    shas = json.loads(
        _node(
            "import {createHash} from 'node:crypto'; import {Scripts} from './src/scripts.js';"
            "const s = new Scripts(); console.log(JSON.stringify(Object.fromEntries("
            "['flush','deregister','prepare','read','evidence'].map(n => "
            "[n, createHash('sha1').update(s.source(n)).digest('hex')]))))"
        )
    )
    for name, script in {"flush": FLUSH, "deregister": DEREGISTER, "prepare": PREPARE,
                         "read": READ, "evidence": EVIDENCE}.items():  # fmt: skip
        assert shas[name] == hashlib.sha1(script.source.encode()).hexdigest(), name


def _corpus() -> list[str]:
    rng = random.Random(7)
    texts = [
        repr(struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]) for _ in range(3000)
    ]
    texts = [t for t in texts if t not in ("nan", "inf", "-inf")]
    texts += [str(rng.uniform(-1e6, 1e6)) for _ in range(500)]
    texts += [f"{rng.randint(1, 999)}e{rng.randint(-330, 330)}" for _ in range(500)]
    texts += [str(rng.getrandbits(rng.randint(1, 300)) * rng.choice((1, -1))) for _ in range(300)]
    for _ in range(500):
        ranges = ((0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0x10FFFF))
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 20)))
        texts.append(json.dumps(text, ensure_ascii=rng.random() < 0.5))
    texts += ['{"z":1,"10":2,"9":[1.5,{"a":null}],"z":3}', "[-0, -0.0, 0e0, 1E+2, 1e-0]"]
    return texts


def test_node_reads_and_writes_json_as_python_does() -> None:
    corpus = _corpus()
    written = json.loads(
        _node(
            "import {parse, encode} from './src/pyjson.js';"
            "let input = ''; process.stdin.on('data', c => input += c);"
            "process.stdin.on('end', () => {"
            "console.log(JSON.stringify(JSON.parse(input).map(t => {"
            "try { return encode(parse(t)); } catch (e) { return null; } })));});",
            json.dumps(corpus),
        )
    )
    for text, node_wrote in zip(corpus, written, strict=True):
        try:
            python_wrote: str | None = encode(_parse(text))
        except Exception:  # the gateway's "malformed JSON"
            python_wrote = None
        assert node_wrote == python_wrote, text
