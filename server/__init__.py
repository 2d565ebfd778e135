"""server: the HTTP service and the ``piggyback`` command line over piggyback_core."""

__all__: list[str] = []
