"""The storage conformance suite lives in the package: L{minstore.testing}."""

from minstore.testing import *  # noqa: F401,F403
from minstore.testing import TRICKY_UIDS, DurableStorageContract, StorageContract, item, record, tombstone, uids_of  # noqa: F401
