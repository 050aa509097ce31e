"""`python -m pgbatch.cli ...`."""
import sys

from pgbatch.cli import main

sys.exit(main())
