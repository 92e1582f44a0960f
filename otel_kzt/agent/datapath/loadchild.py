"""`python -m otel_kzt.agent.datapath.loadchild FD LEVEL REQUEST`: the loader's child process (loader.main).

A module of its own, imported by nothing: run with `-m`, a module the package already imported would be
executed a second time as __main__."""

from __future__ import annotations

import sys

from otel_kzt.agent.datapath.loader import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
