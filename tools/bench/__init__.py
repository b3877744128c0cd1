"""vmmpy's benchmark suite: every scenario of issue 8 beside the machine's limits, measured in
the same run, in one table. Run it with ``python -m tools.bench`` from the repository root (or
``python tools/bench/run.py``); ``--help`` lists the options. docs/performance.md explains the
figures and records a run."""
