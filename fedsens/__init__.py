"""fedsens: the command-line face of the toolkit (logic lives in personalize, sensitivity, reports)."""

__version__ = "0.1.0"
