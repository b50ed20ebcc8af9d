"""The hub plugin: registers the hf:// source resolver and the `minfm hub` commands."""
