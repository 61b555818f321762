"""`mimprobe.cli` with a pause after every recorded batch, so that a test can kill a launch mid-way.

Usage (tests only): ``python tests/features/slow_extract.py SECONDS extract MODEL DATA ...``, also as torchrun's
script. The pause follows each progress record: the manifest of one process (`write_json_atomic` as extract calls
it) and each rank's progress file (`progress.write_rank_progress`). Production code has no such delay.
"""

from __future__ import annotations

import functools
import sys
import time


def _paused(function, seconds: float):
    @functools.wraps(function)
    def recorded_then_paused(*args, **kwargs):
        result = function(*args, **kwargs)
        time.sleep(seconds)
        return result
    return recorded_then_paused


if __name__ == "__main__":
    import importlib

    from mimprobe import cli

    extract = importlib.import_module("mimprobe.features.extraction")  # the module (the package exports a function)
    progress = importlib.import_module("mimprobe.features.progress")
    seconds = float(sys.argv.pop(1))
    extract.write_json_atomic = _paused(extract.write_json_atomic, seconds)
    progress.write_rank_progress = _paused(progress.write_rank_progress, seconds)
    sys.argv[0] = "mimprobe"
    cli.main()
