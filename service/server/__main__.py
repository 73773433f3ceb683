"""``python -m service.server --model BUNDLE``: the gRPC service (same flags as ``vaegan serve``)."""

import sys

from service.server.main import main

if __name__ == "__main__":
    sys.exit(main())
