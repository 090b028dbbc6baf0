"""locust suites against a running switchyard, and the driver that runs them.

Two sides that never import each other: `locustfile` (and the stdlib-only
`sse` it uses) run inside locust's process, where gevent patches the
standard library; `run`, `stack`, `memory` and `results` drive it from
outside (asyncio, `switchyard up`) and start locust as a child process.
tests/test_locust_smoke.py checks both directions.
"""
