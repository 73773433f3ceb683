"""vaegan protocol packages."""
