import sys

from paradit.serve.cli import main

sys.exit(main())
