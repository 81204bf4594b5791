"""The Gradio demo (``hemcap demo``); the library never imports it."""
