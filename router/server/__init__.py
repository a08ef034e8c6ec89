"""Live proxy on aiohttp: endpoints, streaming, pool, health, metrics, auth."""
