"""The name this package is published under, and its installed version.

The import package and the console script are both ``registry``; the distribution on the
package index is ``pg-run-registry`` (``registry`` there is an unrelated package), so install
hints and metadata look-ups use :data:`DISTRIBUTION`.
"""

from __future__ import annotations

from importlib import metadata

#: What ``pip install`` takes: ``pip install 'pg-run-registry[embedded]'``.
DISTRIBUTION = "pg-run-registry"


def installed_version() -> str:
    """The installed distribution's version (``"unknown"`` when run from a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
