import sys

from cprd.cli import main

sys.exit(main())
