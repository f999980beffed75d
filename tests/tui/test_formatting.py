"""Pure pieces of the widgets: bars, status cells, log lines, the attach form's validation."""

from __future__ import annotations

import pytest

from tui.fleetview import ModelRow
from tui.traffic import RequestRecord
from tui.widgets.attach_dialog import default_name, endpoint_from_form
from tui.widgets.devices import fill_style, vram_bar
from tui.widgets.models import ago, status_cell
from tui.widgets.request_log import format_record
from tui.widgets.throughput import ttft_summary


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0, 1.7, -0.2])
def test_vram_bar_has_fixed_width_and_proportional_fill(fraction: float) -> None:
    bar = vram_bar(fraction, width=20)
    assert len(bar.plain) == 20
    assert bar.plain.count("█") == round(max(0, min(1, fraction)) * 20)


def test_fill_style_escalates_with_use() -> None:
    assert [fill_style(f) for f in (0.1, 0.8, 0.95)] == ["green", "yellow", "red"]


def test_ago_picks_a_readable_unit() -> None:
    assert ago(None) == "never"
    assert ago(5).endswith("s ago")
    assert ago(300).startswith("5") and ago(300).endswith("m ago")
    assert ago(7200).startswith("2.0") and ago(7200).endswith("h ago")


def test_status_cell_shows_progress_and_pending_ops() -> None:
    loading = ModelRow(id="m", node="n", status="loading", progress=0.42)
    assert "42%" in status_cell(loading).plain
    loaded = ModelRow(id="m", node="n", status="loaded")
    assert status_cell(loaded).plain == "loaded"
    assert status_cell(loaded, "evicting").plain.startswith("evicting")
    failed = ModelRow(id="m", node="n", status="failed", error="out of memory")
    assert "out of memory" in status_cell(failed).plain


def test_every_fleet_status_has_its_own_look() -> None:
    """The fleet's statuses, an unknown one and a pending op never share a style."""
    statuses = ("loaded", "loading", "evicting", "unloaded", "failed", "down")
    cells = [status_cell(ModelRow(id="m", node="n", status=s)) for s in statuses]
    assert [c.plain for c in cells] == list(statuses)
    unknown = status_cell(ModelRow(id="m", node="n", status="defragmenting"))
    pending = status_cell(ModelRow(id="m", node="n", status="loaded"), "evicting")
    styles = [str(t.style) for t in [*cells, unknown]]
    assert len(set(styles)) == len(styles)
    assert str(pending.style) != str(cells[statuses.index("evicting")].style)


def test_log_line_carries_the_request_facts() -> None:
    r = RequestRecord(7, "qwen", "gpu1", "chat", started=10.0, wall_started=0.0)
    r.first_token, r.finished = 10.125, 12.125
    r.prompt_tokens, r.completion_tokens, r.status = 11, 21, "ok"
    line = format_record(r).plain
    for fact in ("#7", "qwen@gpu1", "ok", "ttft 125 ms", "11→21 tok", "10.0 tok/s", "2.12 s"):
        assert fact in line
    r.status, r.error = "error", "device lost"
    assert "device lost" in format_record(r).plain


def test_log_line_keeps_the_api_and_status_columns_apart() -> None:
    r = RequestRecord(1, "qwen", "gpu1", "completions", started=0.0, wall_started=0.0)
    r.status = "ok"
    assert "completions ok" in format_record(r).plain


def test_ttft_summary() -> None:
    assert "no requests" in ttft_summary([])
    text = ttft_summary([0.1, 0.3, 0.2])
    assert "last 200 ms" in text and "p50 200 ms" in text and "max 300 ms" in text


def test_attach_form_validates_like_the_config_file() -> None:
    ep = endpoint_from_form(" http://gpu-box:13131/ ", "", "")
    assert (ep.name, ep.endpoint, ep.token) == ("gpu-box:13131", "http://gpu-box:13131", None)
    assert default_name("https://user@h:1") == "h:1"
    assert endpoint_from_form("http://h:1", "big", "s3cret").token == "s3cret"
    with pytest.raises(ValueError, match="endpoint") as refused:
        endpoint_from_form("gpu-box:13131")
    assert "Value error" not in str(refused.value)  # pydantic's prefix, not the reason
