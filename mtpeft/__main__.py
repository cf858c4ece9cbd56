import sys

from mtpeft.cli import main

sys.exit(main())
