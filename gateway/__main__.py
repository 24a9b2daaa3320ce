import sys

from gateway._serve import main

sys.exit(main())
