"""A vLLM-compatible replica simulator: OpenAI routes, /metrics, prefix caching,
token timing, and per-request ground truth under /sim/.

See `python -m loadtests.simulator --help`.
"""

from loadtests.simulator.fleet import SimFleet, start_fleet
from loadtests.simulator.replica import SimReplica
from loadtests.simulator.server import create_app

__all__ = ["SimFleet", "SimReplica", "create_app", "start_fleet"]
