"""vaegan serving: runtime (numpy + onnxruntime), gRPC server, client, batch job. No torch."""
