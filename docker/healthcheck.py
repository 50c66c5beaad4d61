"""Container health check: exit 0 when GET /health answers 200, 1 otherwise.

Standard library only, so the image needs no curl or wget. It asks the port the service was told
to listen on (KOS_PORT), on the loopback interface inside the container.
"""

import os
import sys
import urllib.request

port = os.environ.get("KOS_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception as exc:  # refused, timed out, or an HTTP error such as 503 while models load
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
