"""Built-in plugin 'text_encoders' (being written)."""
