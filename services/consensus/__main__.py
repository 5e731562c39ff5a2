import sys

from services.consensus.server import main

sys.exit(main())
