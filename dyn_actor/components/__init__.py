"""Actors that wire the pure parts (engine, router) to mailboxes, and the HTTP frontend."""
