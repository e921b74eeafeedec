import sys

from smtprelay.cli import main

sys.exit(main())
