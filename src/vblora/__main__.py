import sys

from vblora.cli import main

sys.exit(main())
