"""A vLLM-faithful replica simulator: vLLM 0.32's routes and shapes, the tiny
model's tokenizer, an engine with a block-level KV cache (prefix caching,
eviction, preemption, continuous batching), KV-cache events over ZMQ, and
ground truth and fault injection under /sim/.

See `python -m loadtests.simulator --help`.
"""

from loadtests.simulator.fleet import SimFleet, start_fleet
from loadtests.simulator.replica import SimReplica
from loadtests.simulator.server import create_app

__all__ = ["SimFleet", "SimReplica", "create_app", "start_fleet"]
