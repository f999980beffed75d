"""Attach dialog: the URL (and optional name and token) of a remote ``helexa neuron``.

It dismisses with a validated :class:`helexa.config.NeuronEndpoint`, the same model a
``[[neurons]]`` entry of helexa.toml becomes, so a typed URL is checked by the rule the
config file is checked by.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import ValidationError
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from helexa.config import NeuronEndpoint


def default_name(url: str) -> str:
    """A node name from its URL: ``http://gpu-box:13131`` -> ``gpu-box:13131``."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url


def endpoint_from_form(url: str, name: str = "", token: str = "") -> NeuronEndpoint:
    """Validate the form; raises ValueError with a one-line reason."""
    url = url.strip()
    try:
        return NeuronEndpoint(
            name=name.strip() or default_name(url), endpoint=url, token=token.strip() or None
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        # pydantic prefixes a validator's own ValueError with "Value error, ": noise here
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{err['loc'][0]}: {msg}") from None


class AttachDialog(ModalScreen[NeuronEndpoint | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(
                "Attach a remote neuron  (enter: attach · esc: cancel)", classes="dialog-title"
            )
            yield Input(placeholder="http://host:13131", id="attach-url")
            yield Input(placeholder="name (default: host:port)", id="attach-name")
            yield Input(placeholder="bearer token (optional)", password=True, id="attach-token")
            yield Label("", id="attach-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            endpoint = endpoint_from_form(
                self.query_one("#attach-url", Input).value,
                self.query_one("#attach-name", Input).value,
                self.query_one("#attach-token", Input).value,
            )
        except ValueError as exc:
            self.query_one("#attach-error", Label).update(str(exc))
            return
        self.dismiss(endpoint)

    def action_cancel(self) -> None:
        self.dismiss(None)
