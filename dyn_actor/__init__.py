"""dyn-actor: disaggregated LLM serving on one box, built from actors."""

__version__ = "0.1.0"
