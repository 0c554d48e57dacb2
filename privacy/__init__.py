"""The privacy stage: the only reader of sensitive shard sets.

- :mod:`privacy.boundary`  mark a shard set sensitive; ``check_readable`` refuses it to every other job
- :mod:`privacy.release`   noisy copies ``y = x + s eps`` (one secret-seeded draw per sample) + clean subset
- :mod:`privacy.sfbd`      denoising from ``t*`` by the reverse ODE, SFBD / SFBD flow schedules, the denoised pool
- :mod:`privacy.train`     ``flowrail privacy train``: Ray Train + DeepSpeed worker loop for every method
- :mod:`privacy.audit`     Carlini extraction, nearest-neighbour and max-cosine statistics
- :mod:`privacy.audit_run` ``flowrail privacy audit``: audit a checkpoint (samples and reconstructions) into MLflow
"""
