"""`jaxpeft demo`: the end-to-end job on embedded defaults (no downloads)."""
