"""Built-in plugin 'flow' (being written)."""
