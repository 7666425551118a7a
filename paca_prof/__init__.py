"""paca-prof: where a fine-tuning step's time and memory go, PaCA against LoRA, DoRA and full
fine-tuning. See DESIGN.md for the one-way flow: presets/methods -> engines -> trace -> analyze."""

__version__ = "0.1.0"
