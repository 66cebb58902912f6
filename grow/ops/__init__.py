"""Plan builders, one module per operator. Each takes a ModelView and options and returns a Plan."""

from . import hypercloning, select, subclone

EXPAND_METHODS = {
    "hypercloning": hypercloning.build,
}
SHRINK_METHODS = {
    "select": select.build,
    "subclone": subclone.build,
}
UPCYCLE_METHODS: dict = {}
