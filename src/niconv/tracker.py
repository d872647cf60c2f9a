"""Loky's resource tracker, quiet about what it lost when it was killed.

joblib's worker pool has a helper process, the resource tracker, that removes
the pool's semaphores and temporary folders if the run dies. When that helper
is killed (``kill -9``, the out-of-memory killer), loky starts a new one; the
new one never saw the resources its predecessor was told about, and every
later "this resource is released" message about them made it print a
``KeyError`` traceback on the run's terminal; and when the run itself is killed,
the tracker removes what the run left but warns of every item on its terminal.
Nothing is wrong with the run: :func:`run_tracker` runs loky's tracker with those
messages ignored (the removal still happens), and :func:`install` makes loky start
this one.
"""
from __future__ import annotations

import sys
import warnings

# loky's own tracker function, once :func:`install` has replaced it in this process
_loky_main = None


def run_tracker(fd: int, verbose: bool = False) -> None:
    """Run loky's resource tracker, ignoring releases of resources it never registered.

    In the tracker's loop a ``KeyError`` means exactly that (a release of a name
    missing from its cache: registered with a tracker that was killed); any other
    error is printed as loky prints it.
    """
    from joblib.externals.loky.backend import resource_tracker

    def excepthook(kind, value, tb):
        if not issubclass(kind, KeyError):
            sys.__excepthook__(kind, value, tb)

    sys.excepthook = excepthook
    # when the run was killed, the tracker removes what it left (semaphores, memmap folders) and
    # warns of each on the run's terminal: the removal is the point, the warnings are noise
    warnings.filterwarnings("ignore", message="resource_tracker: There appear to be", category=UserWarning)
    (_loky_main or resource_tracker.main)(fd, verbose)


# loky launches ``from <module> import main``: the name is loky's, not a command line's
main = run_tracker


def install() -> None:
    """Make loky start :func:`run_tracker` as its resource tracker, in this process and its relaunches.

    loky launches ``from <main's module> import main; main(fd, verbose)``, taking
    the module of its module-level ``main``. Its warning that it relaunches a killed
    tracker is silenced too: it is about the tracker, not the run.
    """
    try:
        from joblib.externals.loky.backend import resource_tracker
    except ImportError:  # another joblib layout: loky's own tracker, as it is
        return
    global _loky_main
    if getattr(resource_tracker, "main", run_tracker) is not run_tracker:
        _loky_main, resource_tracker.main = resource_tracker.main, run_tracker
    warnings.filterwarnings("ignore", message="resource_tracker: process died unexpectedly", category=UserWarning)
