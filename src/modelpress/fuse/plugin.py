"""The fuse plugin: importing it registers the ``fuse.ot`` merge pass (see modelpress.plugins)."""

from modelpress.fuse import passes  # noqa: F401 - registers fuse.ot
