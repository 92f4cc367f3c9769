"""The HTTP API scenarios, against a chatd node's API worker.

- ``upload``: 1 MB JPEGs through ``/attach/upload``, each one new (a unique
  tail changes its digest), so every upload is decoded, previewed and written;
  the unit is one upload with its preview.
- ``login``: ``/user/login`` of one account; the unit is one login (scrypt
  makes it deliberately expensive).

Closed loop with ``--window`` requests in flight. Figures: requests/s, latency
percentiles, and the server's CPU per request from all of its processes.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from typing import Any

import aiohttp
from PIL import Image

from chatd_bench.hist import Histogram
from chatd_bench.servers import ProcTree

API_SCENARIOS = ("upload", "login")
PASSWORD = "bench-secret"


def jpeg_about_1mb(seed: int = 1) -> bytes:
    """A photo-like 1600x1120 JPEG of about 1 MB (noise does not compress)."""
    noise = random.Random(seed).randbytes(1000 * 700 * 3)
    im = Image.frombytes("RGB", (1000, 700), noise).resize((1600, 1120))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=80)
    return out.getvalue()


async def _account(session: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """Register a fresh account: its mobile and token."""
    mobile = f"1{time.time_ns() % 10**10:010d}"
    async with session.post(base + "/user/register",
                            data={"mobile": mobile, "passwd": PASSWORD}) as resp:
        body = await resp.json()
    if body.get("code") != 0:
        raise RuntimeError(f"register failed: {body}")
    return mobile, str(body["data"]["token"])


async def _run(scenario: str, base: str, tree: ProcTree | None, duration_s: float,
               window: int) -> dict[str, Any]:
    hist = Histogram()
    errors: list[str] = []
    done = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        mobile, token = await _account(session, base)
        image = jpeg_about_1mb() if scenario == "upload" else b""
        seq = 0

        async def one() -> None:
            nonlocal seq
            seq += 1
            if scenario == "upload":
                form = aiohttp.FormData()
                form.add_field("file", image + seq.to_bytes(8, "big"), filename="p.jpg",
                               content_type="image/jpeg")
                req = session.post(base + "/attach/upload", data=form,
                                   headers={"Authorization": f"Bearer {token}"})
            else:
                req = session.post(base + "/user/login",
                                   data={"mobile": mobile, "passwd": PASSWORD})
            async with req as resp:
                body = await resp.json()
            if resp.status != 200 or body.get("code") != 0:
                raise RuntimeError(f"{resp.status} {body.get('msg')}")

        async def worker(end: float) -> None:
            nonlocal done
            while time.monotonic() < end:
                t0 = time.perf_counter_ns()
                try:
                    await one()
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                    errors.append(str(exc))
                    continue
                hist.record(time.perf_counter_ns() - t0)
                done += 1

        cpu0 = tree.cpu_s() if tree else 0.0
        t0 = time.monotonic()
        await asyncio.gather(*(worker(t0 + duration_s) for _ in range(window)))
        elapsed = time.monotonic() - t0
        cpu = (tree.cpu_s() - cpu0) if tree else None
    return {"done": done, "elapsed_s": elapsed, "cpu_s": cpu, "hist": hist, "errors": errors}


def run_api(scenario: str, base: str, server_pid: int | None, label: str,
            duration_s: float, window: int) -> dict[str, Any]:
    """One API scenario against ``base`` (http://host:port); a result row."""
    tree = ProcTree(server_pid) if server_pid else None
    r = asyncio.run(_run(scenario, base, tree, duration_s, window))
    done, elapsed, cpu = r["done"], r["elapsed_s"], r["cpu_s"]
    problems = [f"{len(r['errors'])} requests failed"] if r["errors"] else []
    if not done:
        problems.append("no request succeeded")
    return {
        "target": "chatd", "label": label, "scenario": scenario,
        "unit": "upload" if scenario == "upload" else "login",
        "throughput_per_s": done / elapsed if elapsed else 0.0,
        "server_cpu_us_per_unit": (cpu / done * 1e6) if cpu is not None and done else None,
        "server_util": (cpu / elapsed) if cpu is not None and elapsed else 0.0,
        "client_util_max": None,
        "latency_ms": r["hist"].summary_ms(),
        "done": done, "errors": r["errors"][:3], "problems": problems, "ok": not problems,
    }
