"""The Open Inference Protocol (KServe v2): the model as tensors (core), over REST (rest) and
gRPC (grpc_server)."""
