"""Hugging Face Hub packaging for minFM (``minfm hub push`` / ``pull``, ``hf://`` sources)."""
