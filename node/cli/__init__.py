"""The ``cxrnode`` command line."""
