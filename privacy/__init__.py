"""The privacy stage: the only reader of sensitive shard sets (no formal DP; see docs/PRIVACY.md).

- :mod:`privacy.boundary`  the fence: sensitive sets (walking up to the root), confined manifests, fenced URL prefixes
- :mod:`privacy.noise`     the release noise: HMAC-SHA256(secret, release id, key) seeding Philox
- :mod:`privacy.secret`    the release secret: generated (256 bits, 0600, inside the fence) or >= 128 bits given
- :mod:`privacy.ledger`    per-release records inside the fence (levels, public key -> sensitive key)
- :mod:`privacy.release`   noisy copies ``y = x + s eps``, derived re-releases at higher levels only, consent list
- :mod:`privacy.sfbd`      denoising from ``t*`` by the reverse ODE, SFBD / SFBD flow schedules, the denoised pool
- :mod:`privacy.train`     ``flowrail privacy train``: Ray Train + DeepSpeed worker loop for every method
- :mod:`privacy.audit`     Carlini extraction, nearest-neighbour and max-cosine statistics, bounds and floors
- :mod:`privacy.audit_run` ``flowrail privacy audit``: audit a checkpoint, its pass criterion, into MLflow
- :mod:`privacy.gate`      nothing of a privacy-stage model leaves (grid, register) before a passing audit
"""
