"""Built-in plugin 'knapformer' (being written)."""
