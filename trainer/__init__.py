"""Training side of vaegan: datasets, the training loop, calibration, evaluation and plots.

Nothing is imported here, so importing a submodule never pulls in torch by accident.
"""
