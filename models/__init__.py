"""The VAE-GAN networks and losses: torch ``nn.Module``s only, no I/O."""

from models.config import ModelConfig
from models.discriminator import Discriminator
from models.encoder import Encoder
from models.generator import Generator
from models.losses import AdversarialLoss, KLDivergence, ReconstructionLoss
from models.vaegan import VAEGAN, reparameterize

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
]
