"""vaegan.v1: ``outlier_service.proto`` and its generated ``*_pb2`` / ``*_pb2_grpc`` modules."""
