"""The HTTP API (aiohttp). ``create_app`` builds it; each module registers its routes."""
