"""The prune plugin: importing it registers the pruning passes (see modelpress.plugins)."""

from modelpress.prune import classwise, global_, passes  # noqa: F401 - registers prune.* passes
from modelpress.prune.blocks import pass_  # noqa: F401 - registers prune.fuse_blocks
