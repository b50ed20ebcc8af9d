"""Built-in plugin 'flux' (being written)."""
