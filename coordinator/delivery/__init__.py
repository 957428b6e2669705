"""Getting a model to devices once: packaging, one-shot deploy and rollback.

:mod:`.packaging` turns a model file into a signed, quantized artifact; the one-shot
deploy and rollback commands go out over the hub, and :mod:`.tracker` (a pure state
machine) follows each device from ``deploy`` to ``installed``, ``failed`` or
``rejected``. Staged rollouts (:mod:`coordinator.rollout`) reuse the same tracker rules.
"""
