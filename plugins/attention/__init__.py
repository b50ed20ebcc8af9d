"""Built-in plugin 'attention' (being written)."""
