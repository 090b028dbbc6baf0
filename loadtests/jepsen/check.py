"""`python -m loadtests.jepsen.check DIR [ABORT_GAP_TOKENS]`: the T31 audit of a finished run's
directory (history, truth, rows, charges as JSONL), again and offline.
Prints the report; exits 1 on a violation."""

from __future__ import annotations

import sys
from pathlib import Path

from analytics.billing_audit import Allowances, audit, render
from loadtests.jepsen.collect import read_artifacts

# What a replica may generate after the last chunk that reached the ingress
# of a request whose client left, until it sees the connection close: 250 ms
# at the run's 10 ms per token (T16 promises the replica stops within 1 s;
# runs on this loaded machine saw gaps of up to 13 tokens).
ABORT_GAP_TOKENS = 25
# What a replica killed mid-stream may have counted but never sent: the token
# it logged before writing its chunk, and chunks written into a connection
# the kill reset before the ingress read them.
DEATH_GAP_TOKENS = 3


def allowances(abort_gap_tokens: int = ABORT_GAP_TOKENS) -> Allowances:
    """The known deviations a run of the fault schedule may show."""
    return Allowances(abort_gap_tokens=abort_gap_tokens, prompt_estimate=True,
                      death_gap_tokens=DEATH_GAP_TOKENS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    gap_tokens = int(args[1]) if len(args) == 2 else ABORT_GAP_TOKENS
    report = audit(*read_artifacts(Path(args[0])), allow=allowances(gap_tokens))
    print(render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
