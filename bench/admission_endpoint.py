"""Requests per second of ``GET /v1/admission``, beside a bare FastAPI JSON endpoint.

The same harness as ``bench/admin_endpoint.py`` (its bare app, its load generator: wrk, or an
asyncio client without it; interleaved rounds, medians): one ``metering api`` and one bare
uvicorn, each a single process, against a scratch database and Redis prefix. The key's account
is on a package that enforces its hard limits, so the decision looks the account up in the
API's admission copy; the question asked is ``action=publish`` (a connect that is let in counts
against the account until the next tick, and would end up refused under sustained load).
Both bodies are checked before any load. Target: admission >= 0.70 x bare requests/s.

    python bench/admission_endpoint.py [--connections 32 --duration 10 --warmup 2 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import ExitStack

import httpx

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import exit_on_sigterm, scratch_engine
from bench.admin_endpoint import add_arguments, compare, interleaved, start_servers
from metering.accounts import service as accounts
from metering.core.database import unit_of_work
from metering.core.settings import get_settings
from metering.limits import staff
from metering.limits.wiring import admission_store

TARGET = 0.70


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args()
    threads = args.threads or (1 if shutil.which("wrk") else 2)
    exit_on_sigterm()

    with scratch_engine() as scratch, ExitStack() as stack:
        with unit_of_work() as session:
            key = accounts.create_key(session, scratch.app_id, ["admission"]).key
            info = accounts.authenticate(session, key)
            assert info is not None
            limits = {"connections": (1000, 2000), "messages": (10**9, 10**9)}
            staff.create_package(session, "bench", limits)
            change = staff.set_package(session, info.account_id, "bench", by="bench")
        admission_store(get_settings()).write(change.admission)

        bare_port, api_port = start_servers(stack, scratch.child_env())
        url = f"http://127.0.0.1:{api_port}/v1/admission?app={scratch.app_id}&action=publish"
        targets = {
            "bare": (f"http://127.0.0.1:{bare_port}/bare", {}),
            "admission": (url, {"IM-API-KEY": key}),
        }
        answer = httpx.get(url, headers={"IM-API-KEY": key}, timeout=5).json()
        if answer.get("result", {}).get("allowed") is not True:
            raise RuntimeError(f"/v1/admission answered {json.dumps(answer)}")
        results = interleaved(targets, args, threads)

    compare(results, "admission", "GET /v1/admission", args)


if __name__ == "__main__":
    main()
