"""`python -m ldm_deploy ...` is `ldm-deploy ...`."""
from ldm_deploy.cli import main

raise SystemExit(main())
