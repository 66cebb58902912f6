"""Plan builders, one module per operator. Each takes a ModelView and options and returns a Plan."""

from . import hypercloning, upcycle

EXPAND_METHODS = {
    "hypercloning": hypercloning.build,
}
SHRINK_METHODS: dict = {}
UPCYCLE_METHODS = {
    "moe": upcycle.build,
}
