"""watcherd: keep a sandbox workspace alive across pod restarts.

Snapshots a git work tree after each quiet period, uploads git bundles to a blob store when the
workspace goes idle, and restores the newest good one at startup.
"""

__version__ = "0.1.0"
