"""The transport (SiT): interpolant paths, prediction types, training losses, ODE/SDE samplers, guidance, NLL.

Convention: t = 0 noise, t = 1 data, ``x_t = alpha(t) x1 + sigma(t) x0`` (REFERENCE.md sections 1-4).
"""
from pipeline.transport.core import TrainingLoss, Transport, build_transport, default_eps
from pipeline.transport.guidance import guided
from pipeline.transport.likelihood import NLLOutput, nll
from pipeline.transport.objective import TransportObjective
from pipeline.transport.ode import ODESampler
from pipeline.transport.paths import Path, build_path, time_for_noise_level
from pipeline.transport.sampling import Sampler, build_sampler
from pipeline.transport.sde import SDESampler

__all__ = [
    "NLLOutput", "ODESampler", "Path", "SDESampler", "Sampler", "TrainingLoss", "Transport", "TransportObjective",
    "build_path", "build_sampler", "build_transport", "default_eps", "guided", "nll", "time_for_noise_level",
]
