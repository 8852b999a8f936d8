"""The sections of the cluster config (pydantic models, no I/O)."""
