"""Exit codes of every offload-bench command, in one place, so that a nightly job whose only output is an exit
code can tell "the gate failed" from "the gate could not judge" and never mistakes the second for a pass.

0 and 1 are the verdicts; every other code means nothing was judged, and why. The README's "Baselines and
compare" section and the runner's paragraph list them; tests/test_gate.py and tests/test_runner_gate.py pin them.
"""

from __future__ import annotations

OK = 0  # compare: nothing regressed; runner: no cell ended error/crash/timeout
FAILED = 1  # compare: a regression or a lost/changed/missing cell; runner: a cell ended error/crash/timeout
USAGE = 2  # bad arguments, a scenario/baseline/results file that cannot be read, a path that does not exist
NO_BASELINE = 3  # compare: the run's SKU has no baseline file (the message names the command that makes one)
NO_RECORDS = 4  # a run folder or records file without a single readable record
ALL_SKIPPED = 5  # compare, baseline, runner: every cell was skipped (a guard, the wrong profile): nothing measured
ALL_FAILED = 6  # compare: every cell of the run ended crash/error/timeout: nothing measured
UNWRITABLE = 7  # a results/baseline/report folder that cannot be written (checked before any work)
DISK_FULL = 8  # runner: too little free space in the results folder, or a record append failed (ENOSPC)
MERGE_CONFLICT = 9  # merge: the runs disagree (run id, git sha, a cell's spec) or hold two verdicts of one cell
NEWER_RECORD = 10  # merge: a source holds a record of a newer schema than this harness reads (never dropped)
SIGINT = 130  # runner: Ctrl-C (finished cells are kept)
SIGTERM = 143  # runner: SIGTERM (finished cells are kept)

MEANING = {
    OK: "ok",
    FAILED: "regressed / unexpected fates",
    USAGE: "usage or unreadable input",
    NO_BASELINE: "no baseline for the run's SKU",
    NO_RECORDS: "no records",
    ALL_SKIPPED: "every cell skipped",
    ALL_FAILED: "every cell crashed / errored / timed out",
    UNWRITABLE: "an output folder is not writable",
    DISK_FULL: "disk full in the results folder",
    MERGE_CONFLICT: "merge refused: the runs are not one run, or measured one cell twice",
    NEWER_RECORD: "merge refused: a record of a newer schema than this harness (update the harness)",
    SIGINT: "interrupted (SIGINT)",
    SIGTERM: "terminated (SIGTERM)",
}
