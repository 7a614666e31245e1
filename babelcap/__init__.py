"""babelcap: multilingual image-text data and cheap CLIP language adaptation."""

__version__ = "0.1.0"
