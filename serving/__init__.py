"""The serving stack: the HTTP process (api/), the engine process (engine/), and what both share."""
