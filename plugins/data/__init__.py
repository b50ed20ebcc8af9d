"""Built-in plugin 'data' (being written)."""
