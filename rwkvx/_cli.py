"""What rwkvx's command-line tools share: one-line errors and exit statuses.

Every bad input prints ``rwkvx: error: <message>`` and exits 2; a bug prints one line
saying so and exits 1 (RWKVX_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from rwkvx.errors import RwkvxError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, no usage dump: the same shape as every other rwkvx error
        raise RwkvxError(message)


def run_main(body: Callable[[], int], out_of_memory_hint: str = "") -> int:
    """Run a tool's body and turn every way it can fail into one line and an exit status."""
    try:
        return body()
    except RwkvxError as e:
        print(f"rwkvx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, without a second error on exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("rwkvx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"rwkvx: error: out of memory{out_of_memory_hint}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug, not the user's input: say so in one line
        if os.environ.get("RWKVX_DEBUG"):
            raise
        print(f"rwkvx: internal error: {type(e).__name__}: {e} (set RWKVX_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
