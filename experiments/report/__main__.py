"""``python -m experiments.report``: write docs/results.md."""

from experiments.report import main

raise SystemExit(main())
