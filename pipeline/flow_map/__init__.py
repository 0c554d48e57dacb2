"""Flow maps: few-step generators from a trained SiT (MeanFlow identity, Decoupled MeanFlow conditioning).

Time convention as everywhere in flowrail: t = 0 noise, t = 1 data (REFERENCE.md section 11). A flow map jumps
``x_r = x_s + (r - s) u(x_s, s, r)`` with ``u`` the average velocity of the ODE between s and r.

- :mod:`.times`: the training times (``recipe=dmf``: flow-matching t and MeanFlow (s, r); ``split``) and the
  sampling grid
- :mod:`.settings`: the decoupled depth k = round(depth * 8 / 28) and the settings refused in combination
- :mod:`.identity`: the MeanFlow target ``v + (r - s) d/ds u`` by ``torch.func.jvp`` or an fp32 finite difference
- :mod:`.teacher`: the frozen teacher whose velocity is the distillation target
- :mod:`.sampler`: few-step sampling with classifier-free guidance
- :mod:`.objective`: :class:`FlowMapObjective`, the objective seam (``loss``/``sample``) for ``objective.name=flow_map``
"""
