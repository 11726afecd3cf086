"""What a model directory is, without torch: its card, the checks of its files, and the
decoding of an image file into the card's input pixels. Read by the CPU serving process (which
never imports torch) and by the trainer alike. Imports nothing else of imgrec."""

from app.model.card import InputSpec, ModelCard
from app.model.directory import ModelDirError

__all__ = ["InputSpec", "ModelCard", "ModelDirError"]
