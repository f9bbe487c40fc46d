"""`python -m kvsvr.testing.replica_sim`: runs seeds or a scenario script (see runner.main)."""

import sys

from kvsvr.testing.replica_sim.runner import main

if __name__ == "__main__":
    sys.exit(main())
