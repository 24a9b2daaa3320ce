import sys

from devkit._serve import main

sys.exit(main())
