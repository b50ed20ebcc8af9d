"""minFM applications (the Gradio text-to-image demo)."""
