#!/usr/bin/env python3
"""Run the relaychat terminal client (see `python client.py --help`)."""

import sys

from relaychat.cli_client import main

if __name__ == "__main__":
    sys.exit(main())
