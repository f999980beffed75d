"""Attach dialog: the URL (and optional name and token) of a remote ``helexa neuron``.

Enter checks the form by the rule the config file is checked by (the typed values become
a :class:`helexa.config.NeuronEndpoint`, what a ``[[neurons]]`` entry of helexa.toml
becomes) and posts :class:`AttachDialog.Attach` up. The dialog stays open while the
dashboard connects (:attr:`connecting` says to what, and for how long at most) and shows
why when it fails (:attr:`error`), so a typo is fixed in place, not retyped; the
dashboard dismisses it once the node has answered.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import ValidationError
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Input, Label, LoadingIndicator

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


def one_line(reason: str, limit: int = 300) -> str:
    """A failure as one line of at most ``limit`` characters (whatever a server sent)."""
    text = " ".join(reason.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class AttachDialog(ModalScreen[NeuronEndpoint | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    connecting: reactive[str] = reactive("", init=False)  # what it waits on; "" when not
    error: reactive[str] = reactive("", init=False)

    class Attach(Message):
        """The form is valid: connect to ``endpoint`` (the dialog waits, open)."""

        def __init__(self, dialog: AttachDialog, endpoint: NeuronEndpoint) -> None:
            super().__init__()
            self.dialog, self.endpoint = dialog, endpoint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(
                "Attach a remote neuron  (enter: attach · esc: cancel)", classes="dialog-title"
            )
            yield Input(placeholder="http://host:13131", id="attach-url")
            yield Input(placeholder="name (default: host:port)", id="attach-name")
            yield Input(placeholder="bearer token (optional)", password=True, id="attach-token")
            with Horizontal(id="attach-progress"):
                yield LoadingIndicator()
                yield Label("", id="attach-status")
            yield Label("", id="attach-error")

    def on_mount(self) -> None:
        self.query_one("#attach-progress").display = False

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.connecting:
            return  # one attempt at a time
        try:
            endpoint = endpoint_from_form(
                self.query_one("#attach-url", Input).value,
                self.query_one("#attach-name", Input).value,
                self.query_one("#attach-token", Input).value,
            )
        except ValueError as exc:
            self.error = str(exc)
            return
        self.error = ""
        self.post_message(self.Attach(self, endpoint))

    def watch_connecting(self, connecting: str) -> None:
        self.query_one("#attach-progress").display = bool(connecting)
        self.query_one("#attach-status", Label).update(connecting)
        for field in self.query(Input):
            field.disabled = bool(connecting)

    def watch_error(self, error: str) -> None:
        self.query_one("#attach-error", Label).update(one_line(error))
        if error:
            self.query_one("#attach-url", Input).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)
