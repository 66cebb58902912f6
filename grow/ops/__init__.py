"""Plan builders, one module per operator. Each takes a ModelView and options and returns a Plan."""

from . import hypercloning, lemon, msg, select, stack, subclone, upcycle

EXPAND_METHODS = {
    "hypercloning": hypercloning.build,
    "lemon": lemon.build,
    "stack": stack.build,
    "msg": msg.build,
}
SHRINK_METHODS = {
    "select": select.build,
    "subclone": subclone.build,
}
UPCYCLE_METHODS = {
    "moe": upcycle.build,
}
METHODS = {"expand": EXPAND_METHODS, "shrink": SHRINK_METHODS, "upcycle": UPCYCLE_METHODS}  # by operation
