import sys

from services.quantizer.server import main

sys.exit(main())
