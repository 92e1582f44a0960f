"""HTTP serving shared by the enricher and the agent: one aiohttp server with its guards (`server`), its
limits (`limits`, light: configs import it) and a port of plain GET pages (`pages`)."""
