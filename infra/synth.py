"""`make synth`: synthesize every stage to infra/cdk.out (no AWS account needed)."""

from __future__ import annotations

import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
sys.path[:0] = [str(INFRA.parent), str(INFRA)]

from runnerhub_infra.synth import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
