"""The local web chat adapter: `create_app(service, settings)` and `run_web(service, settings)`."""

from bots.web.app import create_app, run_web

__all__ = ["create_app", "run_web"]
