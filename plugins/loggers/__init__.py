"""Built-in plugin 'loggers' (being written)."""
