"""The recover plugin: importing it registers the ``recover`` pass (see modelpress.plugins)."""

from modelpress.recover import passes  # noqa: F401 - registers the recover pass
