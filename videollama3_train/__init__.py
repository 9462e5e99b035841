"""videollama3-train: train VideoLLaMA3 through its four stages on transformers' native model."""

__version__ = "0.1.0"
