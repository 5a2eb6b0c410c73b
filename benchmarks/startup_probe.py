"""Where a one-video ``generate`` spends its seconds before the model load starts.

Runs the command line in this process under cProfile, stops it where the load would
begin (``Runner.ensure_engine``), prints the process age at that point (as the sidecar's
``process_s.at_load`` does) and the profile's top entries.

Usage: PYTHONPATH=src python benchmarks/startup_probe.py generate IMAGE --prompt ... --models DIR ...
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

T0 = time.perf_counter()


def main() -> None:
    prof = cProfile.Profile()
    prof.enable()
    import wanrender.runner as runner
    from wanrender.cli import main as cli_main
    from wanrender.runtime.gpus import process_seconds

    def stop(self, *a, **k):
        # The command catches every exception, so report from here and leave at once.
        prof.disable()
        print(f"process age at the load: {process_seconds()} s; in this script {time.perf_counter() - T0:.2f} s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        sys.stdout.flush()
        os._exit(0)

    runner.Runner.ensure_engine = stop
    sys.argv = ["wanrender", *sys.argv[1:]]
    cli_main()
    print("the command ended before the load")


if __name__ == "__main__":
    main()
