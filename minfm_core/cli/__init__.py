"""The ``minfm`` command line."""
