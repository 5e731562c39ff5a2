import sys

from services.router.server import main

sys.exit(main())
