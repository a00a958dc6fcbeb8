"""KV-cache primitives shared by the engine, the KV transfer and the router."""
