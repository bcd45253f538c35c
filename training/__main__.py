"""`python -m training ...` is `ldm-train ...`."""
from training.cli import main

raise SystemExit(main())
