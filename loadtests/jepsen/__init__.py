"""RELIABILITY T31 `jepsen_billing_soak`: mixed traffic against the whole
stack under a fault schedule, a JSONL history of what every client saw, the
replicas' ground truth on disk, and an offline checker
(analytics/billing_audit.py) over the history, the truth, ClickHouse and the
quota ledgers. `python -m loadtests.jepsen --help`."""
