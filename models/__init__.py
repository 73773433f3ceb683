"""The VAE-GAN networks and losses: torch ``nn.Module``s only, no I/O."""

from vaegan.models.config import ModelConfig
from vaegan.models.discriminator import Discriminator
from vaegan.models.encoder import Encoder
from vaegan.models.generator import Generator
from vaegan.models.losses import AdversarialLoss, KLDivergence, ReconstructionLoss
from vaegan.models.vaegan import VAEGAN, reparameterize, round_robin

__all__ = [
    "VAEGAN",
    "AdversarialLoss",
    "Discriminator",
    "Encoder",
    "Generator",
    "KLDivergence",
    "ModelConfig",
    "ReconstructionLoss",
    "reparameterize",
    "round_robin",
]
