"""``helexa status``: the fleet table of a running gateway, from ``GET /admin/fleet``.

The gateway serves :meth:`Fleet.snapshot` there; this prints it as two aligned tables
(nodes with their devices, then models). :func:`format_fleet_table` is pure so the layout
is tested without a gateway; anything that goes wrong talking to the gateway is one line
on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from helexa.config import Settings, listen_url


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing spaces."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def _device_cell(d: Mapping[str, Any]) -> str:
    used, total = d.get("vram_used_mb"), d.get("vram_total_mb")
    text = f"{d.get('index', 0)}: {d.get('name') or '?'} {_gib(used)}/{_gib(total)} GiB"
    if d.get("utilization_pct") is not None:
        text += f" {d['utilization_pct']:.0f}%"
    if d.get("temp_c") is not None:
        text += f" {d['temp_c']:.0f}°C"
    return text


def format_fleet_table(snapshot: Mapping[str, Any]) -> str:
    """Nodes (one line per device) and models, as ``helexa status`` prints them."""
    node_rows = []
    for node in snapshot.get("nodes") or ():
        name, host = node.get("name", ""), node.get("hostname") or ""
        if not node.get("up"):  # its last devices are stale; why it is down is what matters
            node_rows.append([name, "down", host, node.get("error") or "no answer"])
            continue
        for i, d in enumerate(node.get("devices") or [{}]):
            cells = [name, "up", host] if i == 0 else ["", "", ""]
            node_rows.append([*cells, _device_cell(d) if d else "-"])
    model_rows = []
    for m in sorted(
        snapshot.get("models") or (), key=lambda m: (m.get("id", ""), m.get("node", ""))
    ):
        idle = m.get("idle_s")
        model_rows.append(
            [
                m.get("id", ""),
                m.get("node", ""),
                m.get("status", ""),
                f"{m['vram_used_mb']} MiB" if m.get("vram_used_mb") else "-",
                "yes" if m.get("pinned") else "",
                str(m.get("in_flight") or 0),
                "-" if idle is None else f"{idle:.0f}s",
            ]
        )
    parts = [
        table(["NODE", "STATUS", "HOST", "DEVICES (VRAM used/total)"], node_rows)
        if node_rows
        else "no nodes",
        table(["MODEL", "NODE", "STATUS", "VRAM", "PINNED", "IN-FLIGHT", "IDLE"], model_rows)
        if model_rows
        else "no models",
    ]
    return "\n\n".join(parts)


def gateway_url(settings: Settings) -> str:
    """Where the configured gateway listens, as a client reaches it (wildcards -> loopback)."""
    return listen_url(settings.gateway.listen)


class GatewayRefused(Exception):
    """The gateway answered, but not with a fleet table."""


async def fetch_snapshot(url: str, admin_key: str | None, timeout_s: float = 10.0) -> Any:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
        session.get(f"{url.rstrip('/')}/admin/fleet") as response,
    ):
        if response.status >= 400:
            body = await response.text()
            try:
                message = (await response.json(content_type=None))["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = body.strip()[:200] or response.reason
            raise GatewayRefused(f"HTTP {response.status}: {message}")
        return await response.json(content_type=None)


def run_status(settings: Settings, url: str | None = None, admin_key: str | None = None) -> int:
    url = url or gateway_url(settings)
    key = admin_key or settings.gateway.admin_key or next(iter(settings.gateway.api_keys), None)
    try:
        snapshot = asyncio.run(fetch_snapshot(url, key))
        if not isinstance(snapshot, dict):
            raise GatewayRefused("the answer is not a fleet table")
        text = format_fleet_table(snapshot)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"helexa status: cannot reach the gateway at {url}: {reason}", file=sys.stderr)
        return 1
    except (GatewayRefused, ValueError) as exc:
        print(f"helexa status: {url}: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0
