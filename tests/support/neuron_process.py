"""``helexa neuron`` over a scripted neuron, as its own process, so a test can SIGKILL it.

Run as ``python -m tests.support.neuron_process NAME [--block-after N]``: it serves a
:class:`ScriptedNeuron` (``test-model`` loaded, answering "Hello world") through the same
``serve_until_signalled`` that ``helexa neuron`` runs, on a free loopback port, and prints
the ``serving on URL`` line a parent waits for. ``--block-after N`` makes every answer stop
after N chunks and hang, so the parent can kill it mid-stream.
"""

from __future__ import annotations

import argparse
import asyncio

from helexa.neuron.server import serve_until_signalled
from tests.support.scripted_neuron import Reply, ScriptedNeuron


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--block-after", type=int, default=None)
    args = parser.parse_args()
    neuron = ScriptedNeuron(
        args.name, script=Reply(text=["Hello", " world"], block_after=args.block_after)
    )
    asyncio.run(serve_until_signalled(neuron, "127.0.0.1", 0, None))


if __name__ == "__main__":
    main()
