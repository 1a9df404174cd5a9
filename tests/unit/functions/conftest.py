import sys
from pathlib import Path

# The shared fixtures live next to the backend tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backend"))

from sysbackup_testkit import backend  # noqa: F401
