"""Over-the-air updates on a device.

:mod:`.updates` takes a ``deploy`` command, checks the signed manifest
(:mod:`compress.trust`) before downloading anything, assembles the payload in a
crash-safe staging file (:mod:`.staging`), and :mod:`.installer` installs it into the
inactive slot of the A/B :mod:`.model_store` behind the manifest's health check
(:mod:`.health`), then switches atomically, or rolls back.
"""
