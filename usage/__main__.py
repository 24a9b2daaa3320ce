import sys

from usage._cli import main

sys.exit(main())
