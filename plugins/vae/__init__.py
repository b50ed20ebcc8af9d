"""Built-in plugin 'vae' (being written)."""
