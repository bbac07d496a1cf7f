"""``python -m gateway``: serve the gateway with uvicorn on GATEWAY_HOST:GATEWAY_PORT."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Validate the settings, then run uvicorn with the app factory."""
    # The gateway uses transformers only for tokenizers: keep it from importing torch (seconds, hundreds of MB).
    os.environ.setdefault("USE_TORCH", "0")
    import uvicorn
    from pydantic import ValidationError

    from gateway.app import create_app
    from gateway.error_responses import GatewayError
    from gateway.settings import GatewaySettings
    from toolkit.errors import ToolkitError

    try:
        settings = GatewaySettings()
        app = create_app(settings)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        print(f"error: invalid gateway setting {field}: {first['msg']}", file=sys.stderr)
        return 2
    except (GatewayError, ToolkitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=20, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
