"""Pure pieces of the widgets: bars, sparklines, status cells, request rows, columns that
give way, the attach form's validation, sizes in one unit rule."""

from __future__ import annotations

import pytest

from helexa.cortex.observe import RequestInfo
from helexa.units import mib_text, size_text, used_of_total
from tui.fleetview import DeviceRow, ModelRow, NodeRow
from tui.history import Trend
from tui.traffic import RequestRecord
from tui.widgets.attach_dialog import default_name, endpoint_from_form, one_line
from tui.widgets.details import request_facts
from tui.widgets.devices import (
    device_cells,
    fill_style,
    history_cells,
    node_parts,
    sparkline,
    vram_bar,
)
from tui.widgets.models import REASON_CELLS, ago, status_cell
from tui.widgets.requests import COLUMNS, RequestLine, matches, ordered, request_cells
from tui.widgets.table import Column, fitting
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


def record(**fields: object) -> RequestRecord:
    r = RequestRecord(7, "qwen", "gpu1", "chat", started=10.0, wall_started=0.0)
    for name, value in fields.items():
        setattr(r, name, value)
    return r


def cell(line: RequestLine, column: str) -> str:
    value = request_cells(line)[[c.label for c in COLUMNS].index(column)]
    return value if isinstance(value, str) else value.plain


def test_a_request_row_carries_the_request_facts() -> None:
    r = record(first_token=10.125, finished=12.125, prompt_tokens=11, completion_tokens=21)
    r.status = "ok"
    line = RequestLine(r, now=99.0)  # a finished request no longer moves with the clock
    assert [cell(line, c) for c in ("#", "Model", "Node", "API", "Status")] == [
        "7",
        "qwen",
        "gpu1",
        "chat",
        "ok",
    ]
    assert [cell(line, c) for c in ("TTFT", "Tokens", "tok/s", "Time")] == [
        "125 ms",
        "11→21",
        "10.0",
        "2.1 s",
    ]
    r.status, r.error = "error", "device lost " * 20
    error = cell(line, "Error")
    assert error.startswith("device lost") and error.endswith("…") and len(error) <= 60


def test_a_live_request_counts_and_rates_as_it_streams() -> None:
    """In flight: the counter and the rate move with the clock, not only at the end."""
    r = record(first_token=10.5, completion_tokens=11)
    assert cell(RequestLine(r, now=11.5), "tok/s") == "10.0"
    assert cell(RequestLine(r, now=12.5), "tok/s") == "5.0"
    assert cell(RequestLine(r, now=12.5), "Time") == "2.5 s"
    assert cell(RequestLine(r, now=12.5), "Status") == "streaming"
    assert cell(RequestLine(record(), now=12.5), "Status") == "waiting"  # no token yet


def test_requests_in_flight_come_first_then_the_latest_finished() -> None:
    a, b, c = record(id=1), record(id=2), record(id=3)
    a.finished, a.done_seq = 11.0, 2
    b.finished, b.done_seq = 12.0, 1
    assert [r.id for r in ordered([a, b, c])] == [3, 1, 2]


def test_the_filter_matches_what_a_row_shows_and_where_it_came_from() -> None:
    r = record(error="503 no capacity")
    r.info = RequestInfo("POST", "/v1/messages", "10.1.2.3", "claude-cli/2.0", True)
    assert all(matches(r, n) for n in ("", "QWEN", "gpu1", "no capacity", "claude-cli", "10.1"))
    assert not matches(r, "llama")


def test_request_facts_hold_the_full_error_parameters_and_client() -> None:
    long = "upstream said: " + "x" * 500
    r = record(error=long, finished=11.0, status="error")
    r.info = RequestInfo(
        "POST",
        "/v1/chat/completions",
        "127.0.0.1",
        "OpenAI/Python 2.1",
        False,
        {"max_tokens": 64, "messages": 3, "temperature": 0.2},
    )
    facts = dict(request_facts(r, now=50.0))
    assert facts["error (failed)"] == long
    assert facts["client"] == "127.0.0.1" and facts["user agent"] == "OpenAI/Python 2.1"
    assert facts["parameters"] == '{"max_tokens": 64, "messages": 3, "temperature": 0.2}'
    assert facts["duration"] == "1.00 s"


@pytest.mark.parametrize(
    ("width", "kept"),
    [
        (100, ["a", "b", "c", "d"]),
        (34, ["a", "b", "d"]),  # c gives way first (highest number)
        (24, ["a", "b"]),  # then d: of equal priority, the rightmost goes first
        (5, ["a"]),  # priority 0 always stays
    ],
)
def test_columns_give_way_by_priority(width: int, kept: list[str]) -> None:
    columns = [Column("a", 0), Column("b", 1), Column("c", 2), Column("d", 1)]
    rows = [("x" * 8, "y" * 8, "z" * 8, "w" * 8)]  # each column needs 8 + 2 padding
    assert [columns[i].label for i in fitting(columns, rows, width)] == kept


def test_sparkline_is_on_a_fixed_scale_and_width() -> None:
    assert sparkline([0, 50, 100], top=100, width=5).plain == "  ▁▅█"
    assert sparkline([5, 5], top=100, width=2).plain == "▁▁"  # 5% never draws as full


def test_a_cpu_device_says_there_is_no_gpu_in_one_unit_rule() -> None:
    cpu = DeviceRow("local", 0, "AMD EPYC", 6, 65536, kind="cpu")
    name, _, memory, *_ = device_cells(cpu)
    assert str(name).strip() == "CPU AMD EPYC"
    assert memory == "RAM 6 MiB / 64.0 GiB"
    texts = [str(p) for p in node_parts(NodeRow("local", True, devices=(cpu,)), {}, 80)[:2]]
    assert texts[1].strip() == "no GPU: running on CPU"  # its own line: never cut off
    gpu = DeviceRow("atlas", 1, "RTX 4090", 0, 24564)
    assert device_cells(gpu, wide=False)[2] == "0 B / 24.0 GiB"
    assert len(device_cells(gpu, wide=False)) == 4  # the temperature gives way when narrow


def test_a_devices_history_row_sits_under_its_name_and_bar() -> None:
    util, vram, *_ = history_cells(Trend((0.0, 100.0), (0.5, 0.5)))
    assert str(util) == "    util " + " " * 10 + "▁█"
    assert str(vram).endswith("▅▅") and len(str(vram)) == 16


def test_sizes_follow_one_rule() -> None:
    assert [size_text(n) for n in (512, 40 * 1024, 6 << 20, int(5.7 * (1 << 30)))] == [
        "512 B",
        "40.0 KiB",
        "6 MiB",
        "5.7 GiB",
    ]
    assert mib_text(None) == "-" and mib_text(1024) == "1.0 GiB"
    assert used_of_total(15240, 24564) == "14.9 GiB / 24.0 GiB"


def test_a_failure_stays_on_its_row_until_the_model_loads() -> None:
    """The fleet's row went back to "unloaded" (the node does not list failed paths), but
    the dashboard kept why the load failed: the row says so, cut to fit."""
    unloaded = ModelRow(id="m", node="n", status="unloaded")
    why = "not enough VRAM on device 0: needs 20 GiB, 12 GiB free " * 3
    text = status_cell(unloaded, failure=why).plain
    assert text.startswith("failed not enough VRAM") and text.endswith("…")
    assert len(text) == REASON_CELLS
    loaded = ModelRow(id="m", node="n", status="loaded")
    assert status_cell(loaded, failure=why).plain == "loaded"  # it loaded since


def test_one_line_flattens_and_bounds_what_a_server_sent() -> None:
    assert one_line("<html>\n  <body>\n</html>") == "<html> <body> </html>"
    assert len(one_line("x" * 1000)) == 300


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
