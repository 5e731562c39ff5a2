import sys

from services.model_host.server import main

sys.exit(main())
