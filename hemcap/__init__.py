"""hemcap: teach vision-language models to describe white blood cells like a haematologist.

The library imports with no GPU and no network; heavy dependencies (torch, transformers) are
imported inside the modules that need them.
"""

__version__ = "0.1.0"
