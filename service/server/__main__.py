"""``python -m vaegan.service.server --model BUNDLE``: the gRPC service (same flags as ``vaegan serve``)."""

import sys

from vaegan.service.server.main import main

if __name__ == "__main__":
    sys.exit(main())
