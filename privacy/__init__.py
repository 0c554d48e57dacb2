"""The privacy stage: the only reader of sensitive shard sets (no formal DP; see docs/PRIVACY.md).

- :mod:`privacy.boundary`  marking sets sensitive; the check itself is :mod:`pipeline.data.fence`, below every reader
- :mod:`privacy.noise`     the release noise: HMAC-SHA256(secret, release id, key) seeding Philox
- :mod:`privacy.secret`    the release secret: generated (256 bits, 0600, inside the fence) or a given one that passes
                           an entropy check (>= 128 bits, not constant, periodic, run-like or low-alphabet)
- :mod:`privacy.ledger`    the global, content-keyed release ledger in its own fence: reserve under a lock, commit
                           after; key maps, file hashes, the audit signing key and every audit verdict
- :mod:`privacy.release`   noisy copies ``y = x + s eps``, derived re-releases at higher levels only, consent list
- :mod:`privacy.sfbd`      denoising from ``t*`` by the reverse ODE, SFBD / SFBD flow schedules, the denoised pool
- :mod:`privacy.train`     ``flowrail privacy train``: Ray Train + DeepSpeed worker loop for every method
- :mod:`privacy.audit`     Carlini extraction, nearest-neighbour and max-cosine statistics, bounds and floors
- :mod:`privacy.audit_run` ``flowrail privacy audit``: audit a checkpoint, its pass criterion, into MLflow
- :mod:`privacy.gate`      nothing of a privacy-stage model leaves (grid, register) before a signed, passing audit
"""
