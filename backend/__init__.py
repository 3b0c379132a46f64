"""Label Studio ML backend over :mod:`smartsam` (a thin adapter: no algorithm lives here)."""
