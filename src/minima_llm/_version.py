"""The package version, in a module of its own so any module can read it without cycles."""

__version__ = "0.3.0.dev0"

# Every request names the client, whichever transport sends it, so an upstream's logs can tell.
USER_AGENT = f"minima-llm/{__version__}"
