"""Command lines; the only modules that read ``sys.argv`` and the environment.

* ``dlmuse`` (:mod:`.dlmuse`): DLMUSE on plain NIfTI files;
* ``dlmuse-bids`` (:mod:`.bids_app`): the BIDS App.
"""

from .dlmuse import dlmuse_main

__all__ = ["dlmuse_main"]
