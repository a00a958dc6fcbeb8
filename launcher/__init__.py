"""``python -m launcher``: start every process of a topology, supervise them, stop them cleanly."""
