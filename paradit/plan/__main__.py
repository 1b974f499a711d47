"""`python -m paradit.plan`: the planner's command line (paradit.plan.cli)."""
import sys

from paradit.plan.cli import main

sys.exit(main())
