#!/usr/bin/env python3
"""Run the relaychat server (see `python server.py --help`)."""

import sys

from relaychat.cli_server import main

if __name__ == "__main__":
    sys.exit(main())
