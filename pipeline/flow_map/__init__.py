"""Flow maps: few-step generators from a trained SiT (MeanFlow identity, Decoupled MeanFlow conditioning).

Time convention as everywhere in flowrail: t = 0 noise, t = 1 data (REFERENCE.md section 11). A flow map jumps
``x_r = x_s + (r - s) u(x_s, s, r)`` with ``u`` the average velocity of the ODE between s and r.

- :mod:`.times`: the (s, r) pairs of training and the sampling grid
- :mod:`.identity`: the MeanFlow target ``v + (r - s) d/ds u`` by ``torch.func.jvp`` or a finite difference
- :mod:`.teacher`: the frozen teacher whose velocity is the distillation target
- :mod:`.sampler`: few-step sampling with classifier-free guidance
- :mod:`.objective`: :class:`FlowMapObjective`, the objective seam (``loss``/``sample``) for ``objective.name=flow_map``
"""
