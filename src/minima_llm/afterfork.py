"""One fork hook for every object that must start afresh in a forked child.

multiprocessing forks by default on Linux before Python 3.14, and a child inherits
its parent's objects but none of their threads: a queue nobody serves, a lock a
vanished thread held, a pool whose workers exist only in the parent.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class StartsAfresh(Protocol):
    """What registers: a method the child calls once, right after the fork."""

    def after_fork_in_child(self) -> None:
        """Drop what belongs to the parent's threads; open anew on next use."""
        ...


# Weakly held: registering must not keep a store or transport alive.
_registered: weakref.WeakSet[StartsAfresh] = weakref.WeakSet()


def register(obj: StartsAfresh) -> None:
    """Have ``obj.after_fork_in_child()`` called in every child forked from now on."""
    _registered.add(obj)


def _in_child() -> None:
    for obj in list(_registered):
        obj.after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_in_child)
