"""The gRPC service: servicer, dynamic batcher, conversion, errors, metrics, lifecycle.

Entry points: ``vaegan serve`` / ``python -m vaegan.service.server`` (:mod:`service.server.main`),
``await serve(config)`` (:mod:`service.server.app`) and, for tests and notebooks,
:class:`service.server.testing.ServerThread`. Importing this package loads nothing else.
"""
