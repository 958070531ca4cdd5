"""The MedMNIST 2D datasets fedsens loads by name (a plain list: the registry reads it without importing medmnist,
which imports torch). `tests/test_datasets_more.py` checks it against medmnist's own INFO table. OrganAMNIST
has its own module (the paper's dataset); ChestMNIST is left out: it is multi-label (a scan carries several of
14 findings) and a partition needs one label per image."""

NAMES = (
    "pathmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organcmnist",
    "organsmnist",
)
