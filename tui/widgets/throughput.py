"""Throughput panel: overall and per-model tokens/s sparklines, TTFT of recent requests."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Label, Sparkline

from tui.traffic import recent_rate


def short_name(model: str) -> str:
    """``Qwen/Qwen3-8B-GGUF:Q4_K_M`` -> ``Qwen3-8B-GGUF:Q4_K_M``: the org eats the room."""
    return model.rpartition("/")[2] or model


def ttft_summary(ttfts_s: Sequence[float]) -> str:
    if not ttfts_s:
        return "TTFT  no requests yet"
    ms = [t * 1000 for t in ttfts_s]
    return (
        f"TTFT  last {ms[-1]:.0f} ms · p50 {statistics.median(ms):.0f} ms · "
        f"max {max(ms):.0f} ms  ({len(ms)} recent)"
    )


class RateLine(Horizontal):
    """One labelled sparkline: ``name  12.3 tok/s  ▁▂▅▇``, drawn from :attr:`series`."""

    series: reactive[tuple[float, ...]] = reactive((), always_update=True)

    def __init__(self, name: str, *, classes: str = "") -> None:
        super().__init__(classes=f"rate-line {classes}".strip())
        self.series_name = name
        self.label = Label(name, classes="rate-label")
        self.spark = Sparkline([], classes="rate-spark")

    def compose(self) -> ComposeResult:
        yield self.label
        yield self.spark

    def watch_series(self, series: tuple[float, ...]) -> None:
        self.label.update(f"{short_name(self.series_name):<22.22} {recent_rate(series):7.1f} tok/s")
        self.spark.data = list(series)


@dataclass(frozen=True)
class Rates:
    """Tokens per second, oldest first (overall and per model); TTFTs in s, newest last."""

    overall: tuple[float, ...] = ()
    per_model: Mapping[str, Sequence[float]] = field(default_factory=dict)
    ttfts_s: tuple[float, ...] = ()


class ThroughputPanel(Vertical):
    """Draws :attr:`rates`, set by the dashboard each refresh."""

    rates: reactive[Rates] = reactive(Rates, init=False)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.overall = RateLine("all models", classes="overall")
        self.per_model: dict[str, RateLine] = {}
        self.ttft_label = Label(ttft_summary([]), classes="ttft-label")
        self.ttft_spark = Sparkline([], classes="ttft-spark")
        self.models_box = Vertical(classes="per-model")

    def compose(self) -> ComposeResult:
        yield self.overall
        yield self.models_box
        yield self.ttft_label
        yield self.ttft_spark

    def watch_rates(self, rates: Rates) -> None:
        self.overall.series = tuple(rates.overall)
        for name, series in rates.per_model.items():
            line = self.per_model.get(name)
            if line is None:
                line = self.per_model[name] = RateLine(name)
                self.models_box.mount(line)
            line.series = tuple(series)
        self.ttft_label.update(ttft_summary(rates.ttfts_s))
        self.ttft_spark.data = list(rates.ttfts_s)
