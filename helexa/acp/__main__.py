"""``python -m helexa.acp [acp.toml]``: the agent without the rest of the CLI."""

import sys

from helexa.acp.agent import main

sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
