"""`fedsens compare` (being written)."""


def compare() -> None:
    raise NotImplementedError
