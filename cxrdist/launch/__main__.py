import sys

from cxrdist.launch.cli import main

sys.exit(main())
