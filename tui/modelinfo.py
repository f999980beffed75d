"""What the model detail view says about one model row: the catalogue's entry, whether
its files are here, whether it fits, and when the idle evictor will take it.

Read from the gateway's own objects (settings, fleet, placement), never a second copy:
"fits" is :func:`helexa.cortex.placement.place` asked about that node alone, the answer
the fleet itself would act on.
"""

from __future__ import annotations

from pathlib import Path

from helexa.config import Settings
from helexa.cortex.fleet import Fleet
from helexa.cortex.placement import place
from helexa.neuron.sources import quant_of, resolve_local
from helexa.units import mib_text
from tui.fleetview import ModelRow

Facts = list[tuple[str, str]]


def on_disk(row: ModelRow, settings: Settings) -> str:
    """Whether this host has the files (only the local node's disk is this host's)."""
    profile = settings.profile(row.id)
    if profile is not None and profile.path:
        path = Path(profile.path).expanduser()
        return f"{path}" if path.exists() else f"missing: {path} does not exist"
    if row.node != settings.local.name or not settings.local.enabled:
        return f"on {row.node}'s disk (it lists the model)"
    found = resolve_local(row.id, settings)
    return str(found) if found is not None else f"not downloaded: helexa pull {row.id}"


def fit(row: ModelRow, fleet: Fleet) -> str:
    node = fleet.nodes.get(row.node)
    if node is None or not node.up:
        return f"unknown: {row.node} is down"
    model_id = fleet.catalogue.canonical(row.id)
    placement = place(model_id, [fleet.view(node)], fleet.catalogue, fleet.strategy)
    if placement is None:
        return f"does not fit on {row.node}, even after eviction"
    if placement.loaded or placement.loading:
        return f"{'loaded' if placement.loaded else 'loading'} on {row.node}"
    if placement.evict:
        return f"fits on {row.node} after evicting {', '.join(placement.evict)}"
    return f"fits on {row.node} (devices {', '.join(map(str, placement.devices)) or '—'})"


def idle_eviction(row: ModelRow, settings: Settings) -> str:
    ttl = settings.eviction.idle_ttl_s
    if row.status != "loaded":
        return "—"
    if not ttl:
        return "off (eviction.idle_ttl_s = 0)"
    if row.pinned:
        return "never: pinned"
    if row.in_flight:
        return f"not while serving; {ttl:.0f} s after its last request"
    left = ttl - (row.idle_s or 0.0)
    return f"in {max(0.0, left):.0f} s (idle {row.idle_s or 0:.0f} s of {ttl:.0f} s)"


def model_facts(
    row: ModelRow, settings: Settings, fleet: Fleet, failure: str | None, files: str
) -> Facts:
    """The detail view's facts; ``files`` is :func:`on_disk`'s answer, found off the
    event loop (it walks the disk) by whoever shows them."""
    profile = settings.profile(row.id)
    facts: Facts = [("node", row.node), ("status", row.status)]
    if failure or row.error:
        facts.append(("last failure", failure or row.error or ""))
    facts += [
        ("catalogue", "yes" if profile else "no: offered by the node"),
        ("files", files),
        ("fits", fit(row, fleet)),
        ("aliases", ", ".join(profile.aliases) if profile and profile.aliases else "—"),
        (
            "context",
            f"{profile.context_length} tokens"
            if profile and profile.context_length
            else "the model's own",
        ),
        (
            "quantization",
            (profile.quant if profile and profile.quant else None) or quant_of(row.id) or "—",
        ),
        ("size (catalogue)", mib_text(profile.vram_mb) if profile and profile.vram_mb else "—"),
        ("VRAM in use", mib_text(row.vram_mb) if row.vram_mb else "—"),
        ("devices", ",".join(map(str, row.devices)) or "—"),
        ("pinned", "yes" if row.pinned else "no"),
        ("in flight", str(row.in_flight)),
        ("idle eviction", idle_eviction(row, settings)),
    ]
    return facts
